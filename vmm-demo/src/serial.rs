//! The serial port the guest prints its passes on, assembled into lines per vCPU.
//!
//! The guest writes one byte per `out` to port 0x3f8. Several vCPUs print at once, so the
//! VMM keeps one line buffer per vCPU (it knows which vCPU made each exit) and hands out
//! whole lines. A vCPU may be paused in the middle of a line; the buffered part is device
//! state (the `serial` blob), so a migrated guest finishes its line on the destination.
//!
//! Lines go to a [`Console`]. A vCPU thread never blocks on it: standard output is written
//! by a printer thread fed through a bounded queue, and lines that do not fit are counted
//! as dropped rather than stalling the guest (or a pause) behind a slow terminal.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Longest line kept: a longer one is handed out in pieces.
pub const LINE_MAX: usize = 256;

/// One line the guest printed, without its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLine {
    /// The vCPU that printed it.
    pub vcpu: u32,
    /// The text, invalid UTF-8 replaced.
    pub text: String,
}

impl ConsoleLine {
    /// The pass number of a `"vcpuN pass P"` line.
    pub fn pass(&self) -> Option<u64> {
        self.text.rsplit_once(" pass ")?.1.parse().ok()
    }
}

/// Callback for guest console lines. Runs on the vCPU's thread: it must be quick and must
/// not block.
pub type LineCallback = Arc<dyn Fn(&ConsoleLine) + Send + Sync>;

/// Where guest console lines go.
#[derive(Clone, Default)]
pub enum Console {
    /// Standard output, through a printer thread.
    Stdout,
    /// Standard error, through a printer thread (when standard output carries a report).
    Stderr,
    /// Nowhere (they are still counted).
    #[default]
    Discard,
    /// A callback.
    Callback(LineCallback),
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Console::Stdout => "Stdout",
            Console::Stderr => "Stderr",
            Console::Discard => "Discard",
            Console::Callback(_) => "Callback",
        })
    }
}

enum Sink {
    Printer(SyncSender<ConsoleLine>),
    Discard,
    Callback(LineCallback),
}

/// Line assembly for every vCPU and delivery to the console.
pub(crate) struct Serial {
    pending: Vec<Mutex<Vec<u8>>>,
    sink: Sink,
    printer: Option<std::thread::JoinHandle<()>>,
    lines: AtomicU64,
    dropped: AtomicU64,
}

impl Serial {
    pub(crate) fn new(vcpus: u32, console: Console) -> Serial {
        let mut printer = None;
        let sink = match console {
            Console::Discard => Sink::Discard,
            Console::Callback(cb) => Sink::Callback(cb),
            Console::Stdout | Console::Stderr => {
                let to_stderr = matches!(console, Console::Stderr);
                let (tx, rx) = mpsc::sync_channel::<ConsoleLine>(4096);
                // Ends when the Serial (the only sender) is dropped.
                let spawned = std::thread::Builder::new()
                    .name("console".into())
                    .spawn(move || {
                        let mut out: Box<dyn Write> = if to_stderr {
                            Box::new(std::io::stderr())
                        } else {
                            Box::new(std::io::stdout())
                        };
                        for line in rx {
                            if writeln!(out, "{}", line.text).is_err() {
                                break;
                            }
                        }
                    });
                match spawned {
                    Ok(h) => {
                        printer = Some(h);
                        Sink::Printer(tx)
                    }
                    Err(e) => {
                        tracing::warn!("no console printer thread ({e}): guest output dropped");
                        Sink::Discard
                    }
                }
            }
        };
        Serial {
            pending: (0..vcpus).map(|_| Mutex::new(Vec::new())).collect(),
            sink,
            printer,
            lines: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Bytes vCPU `vcpu` wrote to the port.
    pub(crate) fn write(&self, vcpu: u32, bytes: &[u8]) {
        let Some(buf) = self.pending.get(vcpu as usize) else {
            return;
        };
        let mut buf = buf.lock().unwrap_or_else(|e| e.into_inner());
        for &b in bytes {
            if b == b'\n' || buf.len() >= LINE_MAX {
                let text = String::from_utf8_lossy(&buf).into_owned();
                buf.clear();
                self.emit(ConsoleLine { vcpu, text });
                if b == b'\n' {
                    continue;
                }
            }
            buf.push(b);
        }
    }

    fn emit(&self, line: ConsoleLine) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        match &self.sink {
            Sink::Discard => {}
            Sink::Callback(cb) => cb(&line),
            Sink::Printer(tx) => match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            },
        }
    }

    /// Lines completed so far.
    pub(crate) fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Lines the printer could not keep up with.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The partial lines, as the `serial` blob: per vCPU a u16 length and the bytes.
    pub(crate) fn save(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.pending.len() as u32).to_le_bytes());
        for p in &self.pending {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            out.extend_from_slice(&(p.len() as u16).to_le_bytes());
            out.extend_from_slice(&p);
        }
        out
    }

    /// Restores partial lines saved by [`save`](Self::save).
    pub(crate) fn load(&self, data: &[u8]) -> Result<(), String> {
        let mut lines = Vec::with_capacity(self.pending.len());
        let mut rest = data;
        let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
            if rest.len() < n {
                return Err(format!(
                    "truncated at byte {} reading {what}",
                    data.len() - rest.len()
                ));
            }
            let (a, b) = rest.split_at(n);
            rest = b;
            Ok(a)
        };
        let count = u32::from_le_bytes(take(4, "the vCPU count")?.try_into().unwrap_or_default());
        if count as usize != self.pending.len() {
            return Err(format!(
                "{count} vCPUs in the blob, {} in this VM",
                self.pending.len()
            ));
        }
        for v in 0..count {
            let len = u16::from_le_bytes(take(2, "a line length")?.try_into().unwrap_or_default());
            if len as usize > LINE_MAX {
                return Err(format!(
                    "vCPU {v}'s partial line of {len} bytes exceeds {LINE_MAX}"
                ));
            }
            lines.push(take(len as usize, "a partial line")?.to_vec());
        }
        if !rest.is_empty() {
            return Err(format!("{} trailing bytes", rest.len()));
        }
        for (p, l) in self.pending.iter().zip(lines) {
            *p.lock().unwrap_or_else(|e| e.into_inner()) = l;
        }
        Ok(())
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        // Close the queue, then let the printer finish what the guest printed, so that
        // whatever the VMM prints next comes after it.
        self.sink = Sink::Discard;
        if let Some(h) = self.printer.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn collecting(vcpus: u32) -> (Serial, Arc<Mutex<Vec<ConsoleLine>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let s = Serial::new(
            vcpus,
            Console::Callback(Arc::new(move |l: &ConsoleLine| {
                g.lock().unwrap().push(l.clone())
            })),
        );
        (s, got)
    }

    #[test]
    fn interleaved_vcpus_get_whole_lines() {
        let (s, got) = collecting(2);
        s.write(0, b"vcpu0 pa");
        s.write(1, b"vcpu1 pass 4");
        s.write(0, b"ss 17\nvcpu0");
        s.write(1, b"\n");
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].text, "vcpu0 pass 17");
        assert_eq!(got[0].pass(), Some(17));
        assert_eq!(got[1].vcpu, 1);
        assert_eq!(got[1].pass(), Some(4));
        assert_eq!(s.lines(), 2);
    }

    #[test]
    fn partial_lines_move_with_the_state() {
        let (a, _) = collecting(2);
        a.write(1, b"vcpu1 pa");
        let blob = a.save();
        let (b, got) = collecting(2);
        b.load(&blob).unwrap();
        b.write(1, b"ss 9\n");
        assert_eq!(got.lock().unwrap()[0].text, "vcpu1 pass 9");
        assert_eq!(b.save(), {
            let (c, _) = collecting(2);
            c.save()
        });
        let (three, _) = collecting(3);
        assert!(three.load(&blob).unwrap_err().contains("2 vCPUs"));
    }

    proptest! {
        #[test]
        fn load_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let (s, _) = collecting(2);
            let _ = s.load(&data);
        }

        #[test]
        fn save_load_round_trips(a in proptest::collection::vec(32u8..127, 0..LINE_MAX), b in proptest::collection::vec(32u8..127, 0..LINE_MAX)) {
            let (s, _) = collecting(2);
            s.write(0, &a);
            s.write(1, &b);
            let blob = s.save();
            let (t, _) = collecting(2);
            t.load(&blob).unwrap();
            prop_assert_eq!(t.save(), blob);
        }
    }
}
