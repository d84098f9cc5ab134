//! A client of the control socket ([`crate::protocol`]), with typed replies and events.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::protocol::{
    Done, ErrorReply, Event, MigrateRequest, RecoverRequest, Reply, Request, ServerLine,
    StatusReply,
};
use crate::report::MigrationReport;

/// Longest answer line the client reads: a migration report with thousands of passes
/// fits many times over.
const MAX_ANSWER_LINE: u64 = 16 << 20;

/// Why a control-socket call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No server answered at the path in time.
    #[error("connecting to the control socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The last connect error.
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("control socket {}: {what}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The server closed the connection before its answer.
    #[error("control socket {}: closed before an answer", path.display())]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// The server sent a line that is not an answer of the expected shape.
    #[error("control socket {}: not an answer: {line:?}", path.display())]
    BadAnswer {
        /// The socket.
        path: PathBuf,
        /// The line, cut to 200 characters.
        line: String,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// The server answered with an error.
    #[error("{}", .0.desc)]
    Refused(ErrorReply),
    /// The request could not be written as JSON.
    #[error("encoding the request")]
    Encode(#[source] serde_json::Error),
}

impl ClientError {
    /// The server's error reply, when it answered with one.
    pub fn reply(&self) -> Option<&ErrorReply> {
        match self {
            ClientError::Refused(r) => Some(r),
            _ => None,
        }
    }
}

/// A connection to `vmm-demo run --control`.
pub struct ControlClient {
    path: PathBuf,
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlClient {
    /// Connects to the socket at `path` (a bare path, or `unix:PATH`), retrying until
    /// `timeout` for a server that is still starting.
    pub fn connect(path: &Path, timeout: Duration) -> Result<ControlClient, ClientError> {
        let path = match path.to_str().and_then(|s| s.strip_prefix("unix:")) {
            Some(p) => PathBuf::from(p),
            None => path.to_path_buf(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(&path) {
                Ok(s) => {
                    let r = s.try_clone().map_err(|source| ClientError::Io {
                        path: path.clone(),
                        what: "cloning the connection",
                        source,
                    })?;
                    return Ok(ControlClient {
                        path,
                        w: s,
                        r: BufReader::new(r),
                    });
                }
                Err(source) if Instant::now() >= deadline => {
                    return Err(ClientError::Connect { path, source });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Sends `req`, passes each event line to `on_event`, and returns the answer's value.
    pub fn call<R: DeserializeOwned>(
        &mut self,
        req: &Request,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<R, ClientError> {
        let mut line = serde_json::to_string(req).map_err(ClientError::Encode)?;
        line.push('\n');
        self.send_raw(&line)?;
        loop {
            match self.read_line::<R>()? {
                ServerLine::Event(e) => on_event(&e),
                ServerLine::Reply(Reply::Return(r)) => return Ok(r),
                ServerLine::Reply(Reply::Error(e)) => return Err(ClientError::Refused(e)),
            }
        }
    }

    /// Writes `line` as it is (for tests of what the server does with any bytes).
    pub fn send_raw(&mut self, line: &str) -> Result<(), ClientError> {
        self.w
            .write_all(line.as_bytes())
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                what: "sending the request",
                source,
            })
    }

    /// Reads one line from the server.
    pub fn read_line<R: DeserializeOwned>(&mut self) -> Result<ServerLine<R>, ClientError> {
        let mut line = String::new();
        let n = (&mut self.r)
            .take(MAX_ANSWER_LINE)
            .read_line(&mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                what: "reading the answer",
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Closed {
                path: self.path.clone(),
            });
        }
        let bad = |source| ClientError::BadAnswer {
            path: self.path.clone(),
            line: line.chars().take(200).collect(),
            source,
        };
        match serde_json::from_str::<ServerLine<R>>(&line) {
            Ok(l) => Ok(l),
            // The untagged line says only that nothing matched; the answer's own
            // deserializer says what is wrong with it.
            Err(_) => serde_json::from_str::<Reply<R>>(&line)
                .map(ServerLine::Reply)
                .map_err(bad),
        }
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<StatusReply, ClientError> {
        self.call(&Request::QueryStatus, &mut |_| {})
    }

    /// `migrate`, with its events passed to `on_event`.
    pub fn migrate(
        &mut self,
        req: MigrateRequest,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<MigrationReport, ClientError> {
        self.call(&Request::Migrate(req), on_event)
    }

    /// `migrate-cancel`.
    pub fn cancel(&mut self) -> Result<(), ClientError> {
        self.call::<Done>(&Request::MigrateCancel, &mut |_| {})
            .map(|_| ())
    }

    /// `migrate-start-postcopy`: switch the running hybrid to post-copy.
    pub fn start_postcopy(&mut self) -> Result<(), ClientError> {
        self.call::<Done>(&Request::MigrateStartPostcopy, &mut |_| {})
            .map(|_| ())
    }

    /// `migrate-recover`: the running post-copy dials `uri` from now on.
    pub fn recover(&mut self, uri: &str) -> Result<(), ClientError> {
        self.call::<Done>(
            &Request::MigrateRecover(RecoverRequest { uri: uri.into() }),
            &mut |_| {},
        )
        .map(|_| ())
    }

    /// `quit`.
    pub fn quit(&mut self) -> Result<(), ClientError> {
        self.call::<Done>(&Request::Quit, &mut |_| {}).map(|_| ())
    }
}
