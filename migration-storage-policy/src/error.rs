//! Errors: bad input, and what detection could not read.

use std::io;

/// Why a check could not be made. Every variant is bad input or an unreadable path: the
/// command line turns each into exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value that is not one of the accepted names.
    #[error("unknown {what} {value:?} (expected one of: {expected})")]
    UnknownValue {
        /// What was being parsed.
        what: &'static str,
        /// The value given.
        value: String,
        /// The accepted values.
        expected: String,
    },
    /// A plan file that does not parse or does not make sense.
    #[error("plan {file}: {message}")]
    Plan {
        /// The plan file (or `<inline>`).
        file: String,
        /// What is wrong, with the line where the parser knows it.
        message: String,
    },
    /// A path that could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// What the path was for (image header, plan file...).
        what: &'static str,
        /// The path.
        path: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// Detection could not decide a value that was not given.
    #[error("disk {disk:?}: {message}")]
    Undetectable {
        /// The disk's name.
        disk: String,
        /// What could not be detected, why, and which flag to give instead.
        message: String,
    },
}
