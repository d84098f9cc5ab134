//! The exit statuses of `vmm-demo`'s commands, one meaning each across commands.

/// Success: verified (`run`, `destination`, `demo`), or migrated (`migrate`).
pub const OK: u8 = 0;
/// Failed, and the guest runs where it was: on the source after a failed migration, not
/// on the destination that refused it.
pub const FAILED: u8 = 1;
/// `run`: the oracle failed, or a failed migration left the guest paused on the source.
pub const NOT_VERIFIED: u8 = 2;
/// The guest is lost: a post-copy committed (the guest ran on the destination from then
/// on) and the destination was lost. The source's copy is stale and stays paused:
/// resuming it would roll the guest back. `migrate`, `run` and `demo`.
pub const GUEST_LOST: u8 = 3;
/// The destination ran the guest after a post-copy commit and then lost the source (or
/// could not place a page): the guest is paused there, with pages only the source had.
/// `destination` and `demo`.
pub const PAUSED_INCOMPLETE: u8 = 4;
