//! `localize` pipelines: bounding boxes from MedGemma 1.5, after Google's anatomy
//! localization notebook. Each image of a unit (each radiograph of a study) is padded to a
//! square (centred, black), and asked, once for each object of `[localize]`, where the object
//! is; the answer — reasoning, then `Final Answer: ```json[…]```` — is decoded under a
//! grammar whose JSON part is the pipeline's schema (a list of `{"box_2d": [y0, x0, y1, x1],
//! "label": …}` on a 0–1000 scale of the padded image). A thinking trace
//! (`generation.thinking`) is dropped. Each box is a row with its label, its normalised
//! values as answered, and its corners in pixels of the original image (the padding undone,
//! clamped to the image).

use crate::grammar::localize_grammar;
use crate::model_call::{ask_each, Prompt, Segment};
use crate::parquet_out::{job_columns, ErrorReason, ErrorRow, ErrorStage, ParquetOutError};
use crate::pipeline::{LoadedPipeline, PipelineError};
use crate::pipelines::{Outcome, Pipeline, RunCx, Unit};
use arrow::array::{ArrayRef, Float64Builder, Int32Builder, StringArray, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use medbatch_engine::image::{pad_to_square, Rgb8};
use medbatch_schemas::pipeline::LocalizeSpec;
use serde_json::Value;
use std::sync::Arc;

/// The spec's `[localize]` section (checked at load).
fn spec(p: &LoadedPipeline) -> &LocalizeSpec {
    p.spec.localize.as_ref().expect("task = \"localize\" pipelines have a [localize] section")
}

/// The columns of a box table.
fn table_schema() -> SchemaRef {
    let mut fields = vec![
        // The unit (study UID, file name), the image's place among its images and the file
        // it came from.
        Field::new("document_id", DataType::Utf8, false),
        Field::new("image_index", DataType::UInt32, false),
        Field::new("image_source_uri", DataType::Utf8, false),
        // What the prompt asked for (`localize.objects`), the box's place in the answer and
        // the label the model gave it.
        Field::new("object", DataType::Utf8, false),
        Field::new("box_index", DataType::UInt32, false),
        Field::new("label", DataType::Utf8, false),
        // The box as answered: 0–1000 of the (padded) image's height and width.
        Field::new("y0", DataType::Int32, false),
        Field::new("x0", DataType::Int32, false),
        Field::new("y1", DataType::Int32, false),
        Field::new("x1", DataType::Int32, false),
        // Its corners in pixels of the original image (padding undone, clamped to it).
        Field::new("x_min", DataType::Float64, false),
        Field::new("y_min", DataType::Float64, false),
        Field::new("x_max", DataType::Float64, false),
        Field::new("y_max", DataType::Float64, false),
        Field::new("image_width", DataType::UInt32, false),
        Field::new("image_height", DataType::UInt32, false),
        Field::new("source_uri", DataType::Utf8, false),
        Field::new("input_sha256", DataType::Utf8, false),
    ];
    fields.extend(medbatch_schemas::tables::provenance_fields().into_iter().skip(2));
    Arc::new(Schema::new(fields))
}

/// Checks that the answer schema is a list of objects with `box_2d` (four integers) and
/// `label` (a string), as the prompt asks.
fn check_schema(schema: &Value) -> Result<(), String> {
    let item = schema
        .get("items")
        .filter(|_| schema.get("type") == Some(&Value::from("array")))
        .ok_or("the answer is a list of boxes: a schema of type \"array\" with `items`")?;
    let props = item.get("properties").ok_or("a box needs `properties`")?;
    let box_ok = props.pointer("/box_2d/items/type") == Some(&Value::from("integer"))
        && props.pointer("/box_2d/minItems") == Some(&Value::from(4))
        && props.pointer("/box_2d/maxItems") == Some(&Value::from(4));
    let label_ok = props.pointer("/label/type") == Some(&Value::from("string"));
    let required = item
        .get("required")
        .and_then(Value::as_array)
        .is_some_and(|r| r.contains(&Value::from("box_2d")) && r.contains(&Value::from("label")));
    if box_ok && label_ok && required {
        Ok(())
    } else {
        Err("a box is an object with required `box_2d` (4 integers) and `label` (a string)".into())
    }
}

/// Pixels of the original `width` × `height` image of a box's normalised `[y0, x0, y1, x1]`
/// on the model's image: the image padded to a square (centred, as [`pad_to_square`] pads)
/// when `padded`, else the image itself. Returns `[x_min, y_min, x_max, y_max]`, clamped.
pub fn box_pixels(b: [i64; 4], width: usize, height: usize, padded: bool) -> [f64; 4] {
    let (w, h) = (width as f64, height as f64);
    let (sx, sy, left, top) = if padded {
        let side = width.max(height);
        (side as f64, side as f64, ((side - width) / 2) as f64, ((side - height) / 2) as f64)
    } else {
        (w, h, 0.0, 0.0)
    };
    let x = |v: i64| (v as f64 / 1000.0 * sx - left).clamp(0.0, w);
    let y = |v: i64| (v as f64 / 1000.0 * sy - top).clamp(0.0, h);
    let (xa, xb, ya, yb) = (x(b[1]), x(b[3]), y(b[0]), y(b[2]));
    [xa.min(xb), ya.min(yb), xa.max(xb), ya.max(yb)]
}

/// The boxes of an answer: the JSON list that ends it, before its closing fence — after the
/// last ```` ```json ````, or else from the first `[` from which the rest is one JSON list
/// (reasoning cut at its token budget may end inside a character, and the fence's bytes
/// then decode into a replacement character).
pub fn answer_boxes(answer: &str) -> Option<Vec<Value>> {
    let body = answer.trim_end();
    let body = body.strip_suffix("```").unwrap_or(body);
    let list = |text: &str| match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(a)) => Some(a),
        _ => None,
    };
    if let Some(at) = body.rfind("```json") {
        if let Some(a) = list(&body[at + "```json".len()..]) {
            return Some(a);
        }
    }
    body.match_indices('[').find_map(|(at, _)| list(&body[at..]))
}

/// A `localize` pipeline.
pub struct Localize {
    pipeline: Arc<LoadedPipeline>,
    schema: SchemaRef,
    /// The answer grammar, built by the first unit (it depends on the model's vocabulary
    /// only, through the thinking tokens' ids).
    grammar: std::sync::OnceLock<medbatch_engine::Grammar>,
}

impl Localize {
    pub fn new(pipeline: Arc<LoadedPipeline>) -> Result<Self, PipelineError> {
        check_schema(&pipeline.schema).map_err(|reason| PipelineError::Invalid {
            path: pipeline.dir.display().to_string(),
            reason: format!("{}: {reason}", pipeline.spec.prompt.schema),
        })?;
        Ok(Self { pipeline, schema: table_schema(), grammar: std::sync::OnceLock::new() })
    }
}

/// The rows being built.
#[derive(Default)]
struct Rows {
    doc: StringBuilder,
    image: UInt32Builder,
    file: StringBuilder,
    object: StringBuilder,
    index: UInt32Builder,
    label: StringBuilder,
    norm: [Int32Builder; 4],
    px: [Float64Builder; 4],
    width: UInt32Builder,
    height: UInt32Builder,
    tokens_in: UInt32Builder,
    tokens_out: UInt32Builder,
    n: usize,
}

#[async_trait::async_trait]
impl Pipeline for Localize {
    fn loaded(&self) -> &LoadedPipeline {
        &self.pipeline
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// A prompt per image and object, all sent at once; a row per box, an error row per
    /// answer that fails.
    async fn run(&self, unit: &Unit, cx: &RunCx<'_>) -> Result<Outcome, ParquetOutError> {
        let (doc, l) = (&unit.doc, spec(&self.pipeline));
        let model_images: Vec<Arc<Rgb8>> = unit
            .images
            .iter()
            .map(|img| if l.pad_to_square { Arc::new(pad_to_square(img)) } else { img.clone() })
            .collect();
        let grammar = self.grammar.get_or_init(|| {
            let thinking = crate::model_call::thinking_ids(&self.pipeline, cx.engine().tokenizer());
            localize_grammar(&self.pipeline.schema, thinking, l.reasoning_tokens)
        });
        // (image, object) of each prompt, image by image.
        let asks: Vec<(usize, &str)> =
            (0..unit.images.len()).flat_map(|k| l.objects.iter().map(move |o| (k, o.as_str()))).collect();
        let end = doc.text.chars().count();
        let segments: Vec<Segment> = asks.iter().map(|_| Segment { start: 0, end, text: "" }).collect();
        // The segments are alike (the image block): prompts are told apart by their place.
        let prepare = |at: usize, _: &Segment<'_>| {
            let (k, object) = asks[at];
            let rendered = self
                .pipeline
                .render_with(medbatch_engine::engine::START_OF_IMAGE, object, "")
                .map_err(|e| (ErrorReason::PromptRender, format!("template error: {}", e.kind())))?;
            Ok(Prompt { rendered, grammar: Some(grammar.clone()), images: vec![model_images[k].clone()] })
        };
        let asked = ask_each(cx, &self.pipeline, doc, &segments, None, prepare).await;
        let mut out = Outcome::from_asked(&asked);
        let files = unit.image_sources();
        let parse_error =
            |reason: ErrorReason, detail: String| ErrorRow::of_document(doc, ErrorStage::Parse, reason, detail, None);
        let mut rows = Rows::default();
        for (&(k, object), reply) in asks.iter().zip(asked.replies) {
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    out.errors.push(e);
                    continue;
                }
            };
            let Some(boxes) = answer_boxes(&reply.answer) else {
                let detail = format!("the answer about image {k} holds no JSON list of boxes");
                out.errors.push(parse_error(ErrorReason::UnparseableAnswer, detail));
                continue;
            };
            let img = &unit.images[k];
            for (b, item) in boxes.iter().enumerate() {
                let coords: Option<Vec<i64>> =
                    item.get("box_2d").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_i64).collect());
                let (Some(label), Some(&[y0, x0, y1, x1])) =
                    (item.get("label").and_then(Value::as_str), coords.as_deref())
                else {
                    let detail = format!("box {b} about image {k} is not a `box_2d` of 4 integers with a `label`");
                    out.errors.push(parse_error(ErrorReason::BadAnswerField, detail));
                    continue;
                };
                let px = box_pixels([y0, x0, y1, x1], img.width, img.height, l.pad_to_square);
                rows.doc.append_value(&doc.id);
                rows.image.append_value(k as u32);
                rows.file.append_value(files.get(k).copied().unwrap_or(doc.source_uri.as_str()));
                rows.object.append_value(object);
                rows.index.append_value(b as u32);
                rows.label.append_value(label);
                for (col, v) in rows.norm.iter_mut().zip([y0, x0, y1, x1]) {
                    col.append_value(i32::try_from(v).unwrap_or(i32::MAX));
                }
                for (col, v) in rows.px.iter_mut().zip(px) {
                    col.append_value(v);
                }
                rows.width.append_value(img.width as u32);
                rows.height.append_value(img.height as u32);
                rows.tokens_in.append_value(reply.tokens_in);
                rows.tokens_out.append_value(reply.tokens_out);
                rows.n += 1;
            }
        }
        if rows.n > 0 {
            let n = rows.n;
            let mut cols: Vec<ArrayRef> = vec![
                Arc::new(rows.doc.finish()),
                Arc::new(rows.image.finish()),
                Arc::new(rows.file.finish()),
                Arc::new(rows.object.finish()),
                Arc::new(rows.index.finish()),
                Arc::new(rows.label.finish()),
            ];
            cols.extend(rows.norm.iter_mut().map(|c| Arc::new(c.finish()) as ArrayRef));
            cols.extend(rows.px.iter_mut().map(|c| Arc::new(c.finish()) as ArrayRef));
            cols.extend([
                Arc::new(rows.width.finish()) as ArrayRef,
                Arc::new(rows.height.finish()),
                Arc::new(StringArray::from(vec![doc.source_uri.as_str(); n])),
                Arc::new(StringArray::from(vec![doc.input_sha256.as_str(); n])),
            ]);
            cols.extend(job_columns(n, cx.provenance));
            cols.extend([Arc::new(rows.tokens_in.finish()) as ArrayRef, Arc::new(rows.tokens_out.finish())]);
            out.batch = Some(RecordBatch::try_new(self.schema.clone(), cols)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn boxes_map_back_to_the_original_image_through_the_padding() {
        // A 200 × 100 image padded to 200 × 200 (50 rows above and below).
        assert_eq!(box_pixels([250, 0, 750, 1000], 200, 100, true), [0.0, 0.0, 200.0, 100.0]);
        assert_eq!(box_pixels([500, 100, 600, 300], 200, 100, true), [20.0, 50.0, 60.0, 70.0]);
        // Into the padding: clamped to the image.
        assert_eq!(box_pixels([0, 0, 100, 100], 200, 100, true), [0.0, 0.0, 20.0, 0.0]);
        // A tall image: columns padded, odd padding as pad_to_square splits it (2 left, 3 right).
        assert_eq!(box_pixels([0, 500, 1000, 1000], 5, 10, true), [3.0, 0.0, 5.0, 10.0]);
        // Corners swapped by the model are put in order; no padding: the image's own scale.
        assert_eq!(box_pixels([600, 300, 500, 100], 200, 100, false), [20.0, 50.0, 60.0, 60.0]);
        let padded = pad_to_square(&Rgb8::new(5, 10, vec![255; 150]));
        assert_eq!((padded.width, &padded.data[..6]), (10, &[0u8, 0, 0, 0, 0, 0][..]));
        assert_eq!(padded.data[6], 255, "two black columns on the left");
    }

    #[test]
    fn the_boxes_are_the_list_after_the_last_json_fence() {
        let a = "The clavicle lies ... ```json is how I answer.\nFinal Answer: ```json\n[{\"box_2d\": [1, 2, 3, 4], \"label\": \"right clavicle\"}]\n```";
        assert_eq!(answer_boxes(a), Some(vec![json!({ "box_2d": [1, 2, 3, 4], "label": "right clavicle" })]));
        assert_eq!(answer_boxes("Final Answer: ```json[]```"), Some(vec![]));
        assert_eq!(answer_boxes("Final Answer: none"), None);
        assert_eq!(answer_boxes("```json{\"box_2d\": [1, 2, 3, 4]}```"), None);
        // A fence lost to a character cut in two: the list that ends the answer; brackets in
        // the reasoning are not it.
        let cut = "See [1] and [2, 3 a\u{fffd}\u{fffd}son[{\"box_2d\": [5, 6, 7, 8], \"label\": \"x\"}]\n```";
        assert_eq!(answer_boxes(cut), Some(vec![json!({ "box_2d": [5, 6, 7, 8], "label": "x" })]));
    }

    #[test]
    fn the_schema_must_be_a_list_of_labelled_boxes() {
        let good = json!({
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "box_2d": { "type": "array", "items": { "type": "integer" }, "minItems": 4, "maxItems": 4 },
                    "label": { "type": "string" }
                },
                "required": ["box_2d", "label"]
            }
        });
        assert!(check_schema(&good).is_ok());
        let mut three = good.clone();
        three["items"]["properties"]["box_2d"]["maxItems"] = json!(3);
        assert!(check_schema(&three).is_err());
        assert!(check_schema(&good["items"]).is_err());
    }
}
