//! The stream header.

use bytes::{BufMut, BytesMut};

use super::error::StreamError;

/// The stream version this build writes and reads.
pub const VERSION: u16 = 1;

/// Length of the stream header.
pub const HEADER_LEN: usize = 32;

const MAGIC_MIGRATION: [u8; 8] = *b"LVMIGSTR";
const MAGIC_RETURN: [u8; 8] = *b"LVMIGRET";

/// Which of the two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Source to destination: RAM, device state, control.
    Migration,
    /// Destination to source: acknowledgements, page requests, the verdict.
    Return,
}

impl Direction {
    pub(crate) fn magic(self) -> [u8; 8] {
        match self {
            Direction::Migration => MAGIC_MIGRATION,
            Direction::Return => MAGIC_RETURN,
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Migration => "migration",
            Direction::Return => "return-path",
        })
    }
}

/// Header flags. Bits 0–7 are optional features, which a decoder that does not know them
/// ignores; bits 8–15 are required features, which it refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct HeaderFlags(pub u16);

impl HeaderFlags {
    /// No flags.
    pub const NONE: HeaderFlags = HeaderFlags(0);
    /// This migration stream resumes an interrupted post-copy of the same VM (see the
    /// module docs). Required: a destination that does not know it must not take the
    /// stream for a new migration.
    pub const POSTCOPY_RESUME: HeaderFlags = HeaderFlags(0x0100);
    /// This stream is the urgent channel of a post-copy migration of the same VM: page
    /// requests on its return path, the pages answering them on it, ahead of the
    /// background push on the main stream. Required: a destination that does not know it
    /// must not take the stream for a migration.
    pub const URGENT: HeaderFlags = HeaderFlags(0x0200);

    /// The required bits.
    pub const REQUIRED_MASK: u16 = 0xff00;
    /// The required bits this build knows.
    pub const KNOWN_REQUIRED: u16 = Self::POSTCOPY_RESUME.0 | Self::URGENT.0;

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: HeaderFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for HeaderFlags {
    type Output = HeaderFlags;
    fn bitor(self, rhs: HeaderFlags) -> HeaderFlags {
        HeaderFlags(self.0 | rhs.0)
    }
}

/// The header that opens each direction of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    /// Feature flags.
    pub flags: HeaderFlags,
    /// The UUID of the VM being migrated; the return path echoes it.
    pub vm_uuid: [u8; 16],
}

impl StreamHeader {
    /// A header with no flags.
    pub fn new(vm_uuid: [u8; 16]) -> Self {
        StreamHeader {
            flags: HeaderFlags::NONE,
            vm_uuid,
        }
    }

    /// Appends the header of the `direction` stream.
    pub fn encode(&self, direction: Direction, out: &mut BytesMut) {
        out.reserve(HEADER_LEN);
        let start = out.len();
        out.put_slice(&direction.magic());
        out.put_u16_le(VERSION);
        out.put_u16_le(self.flags.0);
        out.put_slice(&self.vm_uuid);
        let crc = crc32fast::hash(&out[start..]);
        out.put_u32_le(crc);
    }

    /// Checks the magic alone, as soon as its eight bytes arrive, so a wrong peer is
    /// refused before it sends a whole header.
    pub(crate) fn check_magic(direction: Direction, b: &[u8]) -> Result<(), StreamError> {
        let mut found = [0u8; 8];
        found.copy_from_slice(&b[..8]);
        if found != direction.magic() {
            return Err(StreamError::BadMagic {
                expected: direction,
                found,
            });
        }
        Ok(())
    }

    /// Parses a complete header, in the order magic, version, CRC, flags, UUID.
    pub(crate) fn parse(
        direction: Direction,
        b: &[u8; HEADER_LEN],
        expected_vm: Option<&[u8; 16]>,
    ) -> Result<Self, StreamError> {
        let field = |from: usize| -> u16 { u16::from_le_bytes([b[from], b[from + 1]]) };
        Self::check_magic(direction, b)?;
        let version = field(8);
        if version != VERSION {
            return Err(StreamError::UnsupportedVersion { direction, version });
        }
        let stored = u32::from_le_bytes([b[28], b[29], b[30], b[31]]);
        let computed = crc32fast::hash(&b[..28]);
        if stored != computed {
            return Err(StreamError::HeaderCrc {
                direction,
                stored,
                computed,
            });
        }
        let flags = field(10);
        let unknown = flags & HeaderFlags::REQUIRED_MASK & !HeaderFlags::KNOWN_REQUIRED;
        if unknown != 0 {
            return Err(StreamError::UnknownRequiredFlags {
                direction,
                flags: unknown,
            });
        }
        let mut vm_uuid = [0u8; 16];
        vm_uuid.copy_from_slice(&b[12..28]);
        if let Some(expected) = expected_vm {
            if *expected != vm_uuid {
                return Err(StreamError::VmMismatch {
                    direction,
                    expected: *expected,
                    found: vm_uuid,
                });
            }
        }
        Ok(StreamHeader {
            flags: HeaderFlags(flags),
            vm_uuid,
        })
    }
}
