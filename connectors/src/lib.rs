//! Adapters between medbatch and the outside world.
//!
//! Two seams, each a trait with a local implementation beside the remote one:
//! - [`queue::JobQueue`]: where jobs wait for workers. [`queue::InProcessQueue`] serves the
//!   embedded `medbatch run`; RabbitMQ serves distributed runs.
//! - [`store::ObjectStore`]: where output parts, completion markers and manifests go.
//!   [`store::LocalStore`] writes a directory; S3 serves distributed runs.
//!
//! [`inputs`] opens and lists input files. The implementation is chosen once, at start-up.

pub mod amqp;
pub mod inputs;
pub mod queue;
pub mod s3;
pub mod store;
