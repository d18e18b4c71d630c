//! Adapters between medbatch and the outside world.
//!
//! Two seams, each a trait with a local implementation beside the remote one:
//! - [`queue::JobQueue`]: where jobs wait for workers. [`queue::InProcessQueue`] serves the
//!   embedded `medbatch run`; RabbitMQ serves distributed runs.
//! - [`store::ObjectStore`]: where output parts, completion markers and manifests go.
//!   [`store::LocalStore`] writes a directory; S3 serves distributed runs.
//!
//! [`inputs`] lists and opens input files, local or on S3 ([`s3_input`]).

pub mod amqp;
pub mod inputs;
pub mod queue;
pub mod s3;
pub mod s3_input;
pub mod store;
