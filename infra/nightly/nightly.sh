#!/usr/bin/env bash
# The nightly incremental run (docs/incremental.md): processes only the inputs that are new
# or changed since the committed runs of the same pipeline and model at the output. Its run
# id is the date (UTC), so running it again the same day resumes that night's run instead of
# starting another.
#
#   MEDBATCH_INPUTS   what to read: a folder, an archive or an s3:// prefix (required)
#   MEDBATCH_OUT      where the tables go: a folder or an s3:// prefix (required)
#   MEDBATCH_PIPELINE the pipeline (default cohort-facts)
#   MEDBATCH_MODE     run (this machine's model) or submit (the workers behind RabbitMQ,
#                     MEDBATCH_AMQP_URL); default run
#   MEDBATCH_MODEL    the model (a GGUF file or checkpoint folder; submit reads it for its
#                     digest only), MEDBATCH_BIN the medbatch binary (default: on PATH)
#   MEDBATCH_DIGEST   a second pipeline run over the first one's per-patient table (the
#                     summaries of the night's notes gathered by patient, `patient_notes`),
#                     e.g. patient-digest after note-summary; its run id is the night's with
#                     `-digest`. Unset: no second run. MEDBATCH_DIGEST_TABLE: that table
#                     when the first pipeline names it otherwise.
set -euo pipefail
: "${MEDBATCH_INPUTS:?set MEDBATCH_INPUTS to the archive to read}"
: "${MEDBATCH_OUT:?set MEDBATCH_OUT to the output}"
mode="${MEDBATCH_MODE:-run}"
case "$mode" in
  run | submit) ;;
  *) echo "MEDBATCH_MODE must be run or submit, not $mode" >&2; exit 2 ;;
esac
run_id="nightly-$(date -u +%Y%m%d)"
bin="${MEDBATCH_BIN:-medbatch}"
"$bin" "$mode" "${MEDBATCH_PIPELINE:-cohort-facts}" "$MEDBATCH_INPUTS" \
  --out "$MEDBATCH_OUT" --run-id "$run_id" --incremental
if [ -n "${MEDBATCH_DIGEST:-}" ]; then
  # The night's notes of each patient (committed with the run above), reduced per patient.
  "$bin" "$mode" "$MEDBATCH_DIGEST" "${MEDBATCH_OUT%/}/${MEDBATCH_DIGEST_TABLE:-patient_notes}/run_id=$run_id/" \
    --out "$MEDBATCH_OUT" --run-id "$run_id-digest"
fi
