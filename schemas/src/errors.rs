//! The closed set of `_errors` stages and reasons, and of `_documents` statuses and reasons
//! for leaving an image out. Each has a stable label: the labels are
//! what the `_errors` table holds and what metrics count by, so they never change and no
//! site writes one by hand.

use crate::InputErrorKind;

/// Where in a job an error row arose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorStage {
    /// Reading an input into documents, or a document that cannot be prompted.
    Input,
    /// Preparing, sending or finishing a model request.
    Model,
    /// Turning a finished answer into rows.
    Parse,
}

impl ErrorStage {
    pub const ALL: [Self; 3] = [Self::Input, Self::Model, Self::Parse];

    /// Stable label for the `_errors` table and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Model => "model",
            Self::Parse => "parse",
        }
    }
}

/// What became of an input document, record, member or image file (`_documents.status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DocumentStatus {
    /// Read and run through the pipeline (it may still have given no rows, or some error rows).
    Ok,
    /// Not read, or read and given only error rows: its reason is the first error row's.
    Failed,
    /// Read but left out by the pipeline's recipe (an image past `imaging.max_images`).
    Skipped,
}

impl DocumentStatus {
    pub const ALL: [Self; 3] = [Self::Ok, Self::Failed, Self::Skipped];

    /// Stable label for the `_documents` table and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

/// Why an image file was read but none of its images went into a prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The study already had `imaging.max_images` images before this file's.
    MaxImages,
    /// A series sampled down to `imaging.max_images` slices kept none of this file's.
    SampledOut,
    /// A prior/current comparison takes one image of each study, and it was another file's.
    OnePerStudy,
}

impl SkipReason {
    pub const ALL: [Self; 3] = [Self::MaxImages, Self::SampledOut, Self::OnePerStudy];

    /// Stable label for the `_documents` table and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::MaxImages => "max_images",
            Self::SampledOut => "sampled_out",
            Self::OnePerStudy => "one_image_per_study",
        }
    }
}

/// Why an error row was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    /// An input (file, member, record, image) could not become a document.
    Input(InputErrorKind),
    /// A document longer than a per-document pipeline's one prompt.
    DocumentTooLong,
    /// The prompt template failed on the document.
    PromptRender,
    /// The answer grammar could not be built, or the decoder could not continue it.
    Grammar,
    /// The task awaiting the model's answer failed.
    EngineTask,
    /// The engine could not load what the request needs.
    ModelLoad,
    /// A forward pass failed.
    Inference,
    /// The engine refused the request (too long for the context, say).
    InvalidRequest,
    /// The engine stopped while the request was in flight.
    EngineStopped,
    /// A constrained answer cut off at `max_new_tokens`.
    Truncated,
    /// A free-text answer cut off at `max_new_tokens` before it parsed.
    TruncatedAnswer,
    /// An answer that is not the JSON it should be.
    UnparseableAnswer,
    /// An answer field of the wrong type or shape.
    BadAnswerField,
    /// A lab-report answer without a value.
    MissingValue,
}

impl ErrorReason {
    /// Every reason that is not an input error kind.
    pub const OTHERS: [Self; 13] = [
        Self::DocumentTooLong,
        Self::PromptRender,
        Self::Grammar,
        Self::EngineTask,
        Self::ModelLoad,
        Self::Inference,
        Self::InvalidRequest,
        Self::EngineStopped,
        Self::Truncated,
        Self::TruncatedAnswer,
        Self::UnparseableAnswer,
        Self::BadAnswerField,
        Self::MissingValue,
    ];

    /// Stable label for the `_errors` table and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Input(kind) => kind.label(),
            Self::DocumentTooLong => "document_too_long",
            Self::PromptRender => "prompt_render",
            Self::Grammar => "grammar",
            Self::EngineTask => "engine_task",
            Self::ModelLoad => "model_load",
            Self::Inference => "inference",
            Self::InvalidRequest => "invalid_request",
            Self::EngineStopped => "engine_stopped",
            Self::Truncated => "truncated",
            Self::TruncatedAnswer => "truncated_answer",
            Self::UnparseableAnswer => "unparseable_answer",
            Self::BadAnswerField => "bad_answer_field",
            Self::MissingValue => "missing_value",
        }
    }
}

impl From<InputErrorKind> for ErrorReason {
    fn from(kind: InputErrorKind) -> Self {
        Self::Input(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn labels_are_distinct_snake_case() {
        let mut seen = HashSet::new();
        let labels = ErrorReason::OTHERS
            .iter()
            .map(|r| r.label())
            .chain(crate::document::InputErrorKind::ALL.iter().map(|k| k.label()))
            .chain(ErrorStage::ALL.iter().map(|s| s.label()));
        for l in labels {
            assert!(l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{l}");
            assert!(seen.insert(l), "{l} twice");
        }
    }
}
