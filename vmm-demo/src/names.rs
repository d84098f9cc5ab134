//! Serde for the engines' enums by the names they display as, so that reports and the
//! control protocol carry `"bulk-copy"` or `"prefault"` without a second enum of ours.

use migration_core::stats::Phase;
use migration_precopy::Placement;
use serde::{Deserialize, Deserializer, Serializer};

use crate::cli::parse_phase;

/// A [`Phase`] as its name (`"stop-and-copy"`).
pub mod phase {
    use super::*;

    /// Writes the phase's name.
    pub fn serialize<S: Serializer>(p: &Phase, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(p)
    }

    /// Reads a phase from its name.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Phase, D::Error> {
        let name = String::deserialize(d)?;
        parse_phase(&name).map_err(serde::de::Error::custom)
    }
}

/// An optional [`Phase`] as its name, or null.
pub mod phase_opt {
    use super::*;

    /// Writes the phase's name, or null.
    pub fn serialize<S: Serializer>(p: &Option<Phase>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.collect_str(p),
            None => s.serialize_none(),
        }
    }

    /// Reads a phase from its name, or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Phase>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|name| parse_phase(&name).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A [`Placement`] as its name (`"userfaultfd"`).
pub mod placement {
    use super::*;

    /// Writes the placement's name.
    pub fn serialize<S: Serializer>(p: &Placement, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.as_str())
    }

    /// Reads a placement from its name.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Placement, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}
