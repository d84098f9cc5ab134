//! Running requests against the backend and sending their replies: `sendfile` for reads
//! of page-cache exports, buffers from the connection's pool for `O_DIRECT`, holes from
//! `SEEK_DATA`/`SEEK_HOLE`, and every reply encoded by the connection's [`Session`].
//!
//! [`Session`]: crate::transmission::Session

use std::io::{self, IoSlice};

use bytes::BytesMut;
use tracing::warn;

use super::conn::{Conn, Job};
use crate::addr::Stream;
use crate::backend::{AlignedBuf, ZeroError};
use crate::proto::{NbdErrno, state};
use crate::transmission::{BlockDescriptor, Request};

/// Sends a reply header, telling TCP that data follows so it is not sent alone.
fn send_more(stream: &Stream, bytes: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        match rustix::net::send(
            stream,
            &bytes[done..],
            rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL,
        ) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Errors of the socket side of `sendfile` (the client went away), as opposed to errors
/// reading the file.
fn is_socket_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) | Some(libc::ESHUTDOWN)
    )
}

impl Conn {
    pub(super) fn send(&self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        self.writer
            .lock()
            .expect("writer lock")
            .write_all_vectored(bufs)
    }

    pub(super) fn error_reply(&self, cookie: u64, error: NbdErrno, message: &str) -> BytesMut {
        let mut out = BytesMut::new();
        self.session.encode_error(cookie, error, message, &mut out);
        out
    }

    fn ok_or_error(&self, cookie: u64, what: &str, r: io::Result<()>) -> io::Result<()> {
        let reply = match r {
            Ok(()) => {
                let mut out = BytesMut::new();
                self.session.encode_ok(cookie, &mut out);
                out
            }
            Err(e) => {
                let errno = NbdErrno::from_io(&e);
                warn!("{what} failed: {e}");
                self.error_reply(cookie, errno, &format!("{what}: {e}"))
            }
        };
        self.send(&mut [IoSlice::new(&reply)])
    }

    /// Runs one request and sends its reply; an error means the reply could not be sent.
    pub(super) fn execute(&self, job: Job) -> io::Result<()> {
        let Job {
            cookie,
            request,
            buf,
        } = job;
        let b = &self.backend;
        match request {
            Request::Read { offset, length, df } => self.read(cookie, offset, length, df, buf),
            Request::Write {
                offset,
                length,
                fua,
            } => {
                let buf = buf.expect("write buffer");
                let r = b
                    .write_at(buf.as_slice(), offset)
                    .and_then(|()| if fua { b.flush() } else { Ok(()) });
                self.pool.give(buf);
                self.ok_or_error(cookie, &format!("WRITE offset {offset} length {length}"), r)
            }
            Request::Flush => self.ok_or_error(cookie, "FLUSH", b.flush()),
            Request::Trim {
                offset,
                length,
                fua,
            } => {
                let r = b
                    .trim(offset, length as u64)
                    .and_then(|()| if fua { b.flush() } else { Ok(()) });
                self.ok_or_error(cookie, &format!("TRIM offset {offset} length {length}"), r)
            }
            Request::Cache { offset, length } => self.ok_or_error(
                cookie,
                &format!("CACHE offset {offset} length {length}"),
                b.cache(offset, length as u64),
            ),
            Request::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast,
            } => match b.write_zeroes(offset, length as u64, no_hole, fast) {
                Err(ZeroError::NotFast) => {
                    let reply = self.error_reply(
                        cookie,
                        NbdErrno::ENOTSUP,
                        "WRITE_ZEROES: the filesystem cannot zero faster than writing",
                    );
                    self.send(&mut [IoSlice::new(&reply)])
                }
                Err(ZeroError::Io(e)) => self.ok_or_error(
                    cookie,
                    &format!("WRITE_ZEROES offset {offset} length {length}"),
                    Err(e),
                ),
                Ok(()) => {
                    self.ok_or_error(cookie, "WRITE_ZEROES", if fua { b.flush() } else { Ok(()) })
                }
            },
            Request::BlockStatus {
                offset,
                length,
                req_one,
            } => self.block_status(cookie, offset, length, req_one),
            Request::Disconnect => Ok(()),
        }
    }

    /// Where the data of a read lies: `(offset, length, is_hole)` runs covering the
    /// request, holes only when the reply can say so (structured, no `DF`).
    fn read_segments(&self, offset: u64, length: u32, holes: bool) -> Vec<(u64, u64, bool)> {
        let all_data = vec![(offset, length as u64, false)];
        if !holes || !self.backend.may_have_holes() {
            return all_data;
        }
        match self
            .backend
            .extents(offset, length as u64, 1 + length as usize / 512)
        {
            Ok(ext) if ext.iter().map(|e| e.length).sum::<u64>() == length as u64 => {
                ext.iter().map(|e| (e.offset, e.length, e.hole)).collect()
            }
            // No sparseness information, or the file changed under us: all data.
            _ => all_data,
        }
    }

    fn read(
        &self,
        cookie: u64,
        offset: u64,
        length: u32,
        df: bool,
        buf: Option<AlignedBuf>,
    ) -> io::Result<()> {
        let structured = self.session.structured_replies;
        if structured && length == 0 {
            let mut out = BytesMut::new();
            self.session.encode_done(cookie, &mut out);
            return self.send(&mut [IoSlice::new(&out)]);
        }
        let segments = self.read_segments(offset, length, structured && !df);
        match buf {
            None => self.read_sendfile(cookie, offset, length, &segments),
            Some(mut buf) => {
                let r = self.read_buffered(cookie, offset, length, &segments, &mut buf);
                self.pool.give(buf);
                r
            }
        }
    }

    /// Reads through a buffer (`O_DIRECT` exports).
    fn read_buffered(
        &self,
        cookie: u64,
        offset: u64,
        length: u32,
        segments: &[(u64, u64, bool)],
        buf: &mut AlignedBuf,
    ) -> io::Result<()> {
        let data = buf.as_mut_slice();
        for &(o, l, hole) in segments {
            if hole {
                continue;
            }
            let at = (o - offset) as usize;
            if let Err(e) = self.backend.read_at(&mut data[at..at + l as usize], o) {
                warn!("READ offset {offset} length {length} failed: {e}");
                let reply = self.error_reply(
                    cookie,
                    NbdErrno::from_io(&e),
                    &format!("READ offset {offset} length {length}: {e}"),
                );
                return self.send(&mut [IoSlice::new(&reply)]);
            }
        }
        let mut heads = BytesMut::new();
        let session = &self.session;
        if !session.structured_replies {
            session.encode_ok(cookie, &mut heads);
            return self.send(&mut [IoSlice::new(&heads), IoSlice::new(buf.as_slice())]);
        }
        // Every chunk header, then one vectored write of headers and data in turn.
        let mut ends = Vec::with_capacity(segments.len());
        for (i, &(o, l, hole)) in segments.iter().enumerate() {
            let done = i + 1 == segments.len();
            // Segments lie inside the request, whose length fits in 32 bits.
            if hole {
                session.encode_hole(cookie, o, l as u32, done, &mut heads);
            } else {
                session.encode_data_header(cookie, o, l as u32, done, &mut heads);
            }
            ends.push(heads.len());
        }
        let data = buf.as_slice();
        let mut slices = Vec::with_capacity(segments.len() * 2);
        let mut hpos = 0;
        for (&(o, l, hole), &end) in segments.iter().zip(&ends) {
            slices.push(IoSlice::new(&heads[hpos..end]));
            hpos = end;
            if !hole {
                let at = (o - offset) as usize;
                slices.push(IoSlice::new(&data[at..at + l as usize]));
            }
        }
        self.send(&mut slices)
    }

    /// Reads with `sendfile`: file pages go to the socket without a copy through this
    /// process. A data chunk cannot be marked final before all of it is sent (an error
    /// could still happen), so a `NONE` chunk ends the reply.
    fn read_sendfile(
        &self,
        cookie: u64,
        offset: u64,
        length: u32,
        segments: &[(u64, u64, bool)],
    ) -> io::Result<()> {
        let mut w = self.writer.lock().expect("writer lock");
        let mut head = BytesMut::new();
        let session = &self.session;
        if !session.structured_replies {
            session.encode_ok(cookie, &mut head);
            send_more(&w, &head)?;
            let sent = self.backend.send_to(&*w, offset, length as u64)?;
            if sent < length as u64 {
                // A simple reply cannot report an error after its header: hang up, as
                // the protocol says.
                return Err(io::Error::other(format!(
                    "READ offset {offset} length {length}: file ended after {sent} bytes"
                )));
            }
            return Ok(());
        }
        let mut failed = None;
        for &(o, l, hole) in segments {
            head.clear();
            if hole {
                session.encode_hole(cookie, o, l as u32, false, &mut head);
                send_more(&w, &head)?;
                continue;
            }
            session.encode_data_header(cookie, o, l as u32, false, &mut head);
            send_more(&w, &head)?;
            let sent = match self.backend.send_to(&*w, o, l) {
                Ok(n) => n,
                Err(e) if is_socket_error(&e) => return Err(e),
                Err(e) => {
                    failed = Some((o, e));
                    0
                }
            };
            if sent < l {
                // The chunk must be completed: pad it, then report the error.
                let zeroes = vec![0u8; (l - sent).min(1 << 20) as usize];
                let mut left = l - sent;
                while left > 0 {
                    let n = left.min(zeroes.len() as u64) as usize;
                    std::io::Write::write_all(&mut *w, &zeroes[..n])?;
                    left -= n as u64;
                }
                if failed.is_none() {
                    failed = Some((
                        o + sent,
                        io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than export"),
                    ));
                }
            }
        }
        head.clear();
        match failed {
            None => session.encode_done(cookie, &mut head),
            Some((at, e)) => {
                warn!("READ offset {offset} length {length} failed at {at}: {e}");
                session.encode_error_at(
                    cookie,
                    NbdErrno::from_io(&e),
                    &format!("READ failed at offset {at}: {e}"),
                    at,
                    &mut head,
                )
            }
        }
        std::io::Write::write_all(&mut *w, &head)
    }

    fn block_status(&self, cookie: u64, offset: u64, length: u32, req_one: bool) -> io::Result<()> {
        let max = if req_one { 1 } else { self.max_extents };
        let ext = match self.backend.extents(offset, length as u64, max) {
            Ok(e) if !e.is_empty() => e,
            Ok(_) => {
                let reply = self.error_reply(
                    cookie,
                    NbdErrno::EINVAL,
                    "BLOCK_STATUS: empty range at the end of the export",
                );
                return self.send(&mut [IoSlice::new(&reply)]);
            }
            Err(e) => {
                let reply = self.error_reply(
                    cookie,
                    NbdErrno::from_io(&e),
                    &format!("BLOCK_STATUS offset {offset} length {length}: {e}"),
                );
                return self.send(&mut [IoSlice::new(&reply)]);
            }
        };
        let descriptors: Vec<BlockDescriptor> = ext
            .iter()
            .map(|e| BlockDescriptor {
                // Extents lie inside the request, whose length fits in 32 bits.
                length: e.length as u32,
                flags: if e.hole { state::HOLE | state::ZERO } else { 0 },
            })
            .collect();
        let mut out = BytesMut::new();
        self.session
            .encode_block_status(cookie, &descriptors, &mut out);
        self.send(&mut [IoSlice::new(&out)])
    }
}
