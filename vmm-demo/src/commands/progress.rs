//! A progress bar drawn from a migration's events, only when standard error is a terminal.

use std::io::IsTerminal;

use crate::protocol::Event;

pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg:>16} [{bar:40}] {pos}/{len} pages {wide_msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        });
        Progress { bar }
    }

    pub(crate) fn event(&self, e: &Event) {
        let Some(b) = &self.bar else { return };
        match e {
            Event::Phase { phase } => b.set_message(phase.to_string()),
            Event::Progress {
                pages_total,
                pages_remaining,
                ..
            } => {
                b.set_length(*pages_total);
                b.set_position(pages_total.saturating_sub(*pages_remaining));
            }
            Event::Iteration(p) => b.println(format!(
                "pass {}: {} bytes, {} dirty after, {:.1} MB/s",
                p.iteration,
                p.bytes,
                p.dirty_after,
                p.bandwidth_bps / 1e6
            )),
            Event::Throttle { percent } => {
                b.println(format!("auto-converge: throttle {percent} %"))
            }
            Event::Mirror {
                disk,
                bytes_total,
                bytes_copied,
                dirty_bytes,
                copy_rate_bps,
                write_blocking,
                ..
            } => {
                let mode = if *write_blocking {
                    " (write-blocking)"
                } else {
                    ""
                };
                b.set_message(format!("mirror {disk}{mode}"));
                b.set_length(bytes_total / 4096);
                b.set_position(bytes_total.saturating_sub(*dirty_bytes) / 4096);
                b.set_prefix(format!(
                    "{} MiB copied, {:.1} MB/s",
                    bytes_copied >> 20,
                    copy_rate_bps / 1e6
                ));
            }
            _ => {}
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
