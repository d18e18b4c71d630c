//! Progress display: a bar on a terminal, plain lines otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Seconds between plain progress lines when stderr is not a terminal.
const PLAIN_INTERVAL: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Instant,
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    pub tokens_out: u64,
    unit: &'static str,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        Self::counting(total, "documents")
    }

    /// A progress display counting `unit`s (`documents`, `jobs`).
    pub fn counting(total: u64, unit: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(&format!(
                    "{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit}  {{msg}}  ETA {{eta}}"
                ))
                .expect("valid template"),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        let now = Instant::now();
        Self { bar, started: now, last_line: now, total, done: 0, failed: 0, tokens_out: 0, unit }
    }

    pub fn tokens_per_s(&self) -> f64 {
        self.tokens_out as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    /// More documents than planned were found (record files hold many).
    pub fn found(&mut self, n: u64, planned_for_job: u64) {
        let extra = n.saturating_sub(planned_for_job);
        if extra > 0 {
            self.total += extra;
            if let Some(b) = &self.bar {
                b.set_length(self.total);
            }
        }
    }

    pub fn generated(&mut self, tokens: u64) {
        self.tokens_out += tokens;
        if let Some(b) = &self.bar {
            b.set_message(self.message());
        }
    }

    fn message(&self) -> String {
        if self.tokens_out == 0 && self.unit != "documents" {
            return format!("{} failed", self.failed);
        }
        format!("{:.1} tok/s  {} failed", self.tokens_per_s(), self.failed)
    }

    pub fn document(&mut self, ok: bool) {
        self.done += 1;
        if !ok {
            self.failed += 1;
        }
        self.show();
    }

    /// Sets the counts from a fresh reading (units done, tokens generated so far).
    pub fn set(&mut self, done: u64, tokens_out: u64) {
        let changed = done != self.done;
        self.done = done;
        self.tokens_out = tokens_out;
        if changed || self.bar.is_some() {
            self.show();
        }
    }

    fn show(&mut self) {
        let msg = self.message();
        match &self.bar {
            Some(b) => {
                b.set_position(self.done);
                b.set_message(msg);
            }
            None => {
                if self.last_line.elapsed() >= PLAIN_INTERVAL || self.done == self.total {
                    self.last_line = Instant::now();
                    eprintln!("progress: {}/{} {}, {msg}", self.done, self.total, self.unit);
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
