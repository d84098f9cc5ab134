//! The typed output of a check: verdicts, findings, what libvirt would decide.

use std::fmt;

use serde::Serialize;

use crate::detect::{Backing, FsInfo};
use crate::model::{CacheMode, HostSpec, ImageFormat, NfsExport, StorageKind};
use crate::rules::RuleId;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// A rule that applied and is satisfied.
    Info,
    /// Something to fix or confirm that does not by itself make the migration unsafe.
    Warning,
    /// The migration is unsafe.
    Error,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Info => "ok",
            Severity::Warning => "WARNING",
            Severity::Error => "UNSAFE",
        }
    }
}

/// The answer, for a disk or for the whole plan. Ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Safe by a guarantee of the protocol or the software.
    Safe,
    /// Safe because of how implementations behave (Linux NFS client and server with
    /// `O_DIRECT`...), not because a protocol promises it.
    SafeInPractice,
    /// The destination could read stale or missing data.
    Unsafe,
}

impl Verdict {
    /// True for [`Verdict::Safe`] and [`Verdict::SafeInPractice`].
    pub fn is_safe(self) -> bool {
        self != Verdict::Unsafe
    }

    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Safe => "safe",
            Verdict::SafeInPractice => "safe-in-practice",
            Verdict::Unsafe => "unsafe",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a satisfied rule's safety rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// A protocol or software guarantee.
    Guarantee,
    /// Observed implementation behaviour.
    Practice,
}

/// One rule applied to one disk (or to the plan).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The rule.
    pub rule: RuleId,
    /// How bad.
    pub severity: Severity,
    /// The disk it is about, `None` for plan-wide findings.
    pub disk: Option<String>,
    /// What was found, for this disk.
    pub message: String,
    /// What to do about it (`None` when nothing needs doing).
    pub remedy: Option<String>,
    /// Where the rule comes from.
    pub source: &'static str,
    /// Why the rule holds.
    pub reasoning: &'static str,
    /// For satisfied rules that make a disk safe: what that rests on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basis: Option<Basis>,
}

/// Where an input value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Given explicitly (flag or plan).
    Given,
    /// Detected from the path.
    Detected,
    /// Neither: a documented default.
    Default,
}

/// An input value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolved<T> {
    /// The value.
    pub value: T,
    /// Given, detected or default.
    pub origin: Origin,
    /// How it was detected, or why the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl<T> Resolved<T> {
    /// A value given by the user.
    pub fn given(value: T) -> Self {
        Resolved {
            value,
            origin: Origin::Given,
            detail: None,
        }
    }
    /// A detected value and how.
    pub fn detected(value: T, how: impl Into<String>) -> Self {
        Resolved {
            value,
            origin: Origin::Detected,
            detail: Some(how.into()),
        }
    }
    /// A default and why.
    pub fn default_because(value: T, why: impl Into<String>) -> Self {
        Resolved {
            value,
            origin: Origin::Default,
            detail: Some(why.into()),
        }
    }
}

impl<T: fmt::Display> Resolved<T> {
    fn describe(&self) -> String {
        match self.origin {
            Origin::Given => format!("{} (given)", self.value),
            Origin::Detected => format!("{} (detected)", self.value),
            Origin::Default => format!("{} (default)", self.value),
        }
    }
}

/// How the VMM reaches the image, which is what libvirt's rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// A file on a filesystem of the host.
    File,
    /// A block device of the host.
    BlockDevice,
    /// QEMU's own network driver (a URI).
    Network,
    /// No medium.
    None,
}

/// Everything the rules look at for one disk, each value with its origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskInputs {
    /// The disk's name.
    pub name: String,
    /// The image path or URI on the source.
    pub path: Option<String>,
    /// The image path on the destination, when it differs from `path`.
    pub destination_path: Option<String>,
    /// The storage kind (absent only for an empty drive that names none).
    pub storage: Option<Resolved<StorageKind>>,
    /// File, block device or network driver.
    pub access: Access,
    /// The cache mode.
    pub cache: Resolved<CacheMode>,
    /// The image format (`None`: unknown).
    pub format: Option<Resolved<ImageFormat>>,
    /// The backing file the header names.
    pub backing: Option<Backing>,
    /// For NFS: the export mode.
    pub nfs_export: Option<Resolved<NfsExport>>,
    /// The hosts serving the storage.
    pub servers: Option<Resolved<Vec<String>>>,
    /// The filesystem detection found, when it ran.
    pub filesystem: Option<FsInfo>,
    /// Resized online during the migration.
    pub online_resize: bool,
    /// Read-only.
    pub read_only: bool,
    /// Shareable between guests.
    pub shareable: bool,
    /// Copied by storage migration.
    pub copied: bool,
    /// No medium.
    pub empty: bool,
}

/// Which branch of libvirt's `qemuMigrationSrcIsSafe()` decides a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LibvirtBranch {
    /// No source, or read-only: skipped.
    EmptyOrReadOnly,
    /// In the set copied by `--copy-storage-all`/`--copy-storage-inc`.
    Copied,
    /// `type='network'` (rbd, nbd, iscsi, gluster URIs).
    NetworkDisk,
    /// `virFileIsClusterFS()`: GFS2, OCFS2, CephFS kernel client, `fuse.glusterfs`.
    ClusterFilesystem,
    /// A file on a filesystem `virFileIsSharedFS()` does not list.
    NotSharedFilesystem,
    /// `<shareable/>`.
    Shareable,
    /// Cache `none` or `directsync`.
    CacheBypass,
    /// Any other cache mode, allowed when QEMU has `drop-cache` (QEMU 4.0+, libvirt 5.7+).
    QemuDropsPageCache,
}

/// What libvirt would decide for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LibvirtDisk {
    /// libvirt 5.7+ with QEMU 4.0+ (which have the `drop-cache` capability).
    pub safe: bool,
    /// Older libvirt or QEMU, without that capability.
    pub safe_without_drop_cache: bool,
    /// The branch that decided.
    pub branch: LibvirtBranch,
    /// libvirt's reasoning, or its error message.
    pub message: String,
    /// Whether this checker says the same (safe or not) as `safe`.
    pub agrees: bool,
    /// Where the two differ, why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_different: Option<String>,
}

/// One disk's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskReport {
    /// The disk's name.
    pub name: String,
    /// The disk's verdict.
    pub verdict: Verdict,
    /// What was looked at, with origins.
    pub inputs: DiskInputs,
    /// The rules applied to it.
    pub findings: Vec<Finding>,
    /// What libvirt would decide.
    pub libvirt: LibvirtDisk,
}

/// What libvirt would decide for the whole plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LibvirtSummary {
    /// libvirt would allow the migration (5.7+ with QEMU 4.0+).
    pub safe: bool,
    /// `"safe"` or `"unsafe"`.
    pub verdict: &'static str,
    /// Older libvirt or QEMU, without the `drop-cache` capability.
    pub safe_without_drop_cache: bool,
    /// libvirt's error for the first unsafe disk (it stops there), or why it allows it.
    pub message: String,
    /// True when every disk gets the same answer from both.
    pub agrees: bool,
    /// The disks where the two differ.
    pub differing_disks: Vec<String>,
}

/// The result of a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `verdict != unsafe`.
    pub safe: bool,
    /// The worst disk verdict.
    pub verdict: Verdict,
    /// What libvirt would decide.
    pub libvirt: LibvirtSummary,
    /// Every finding of every disk, in disk order.
    pub findings: Vec<Finding>,
    /// Per-disk results.
    pub disks: Vec<DiskReport>,
    /// The source host, when the plan names it.
    pub source: Option<HostSpec>,
    /// The destination host, when the plan names it.
    pub destination: Option<HostSpec>,
    /// Source and destination run on the same host ([`Plan::same_host`](crate::Plan)).
    pub same_host: bool,
}

impl Report {
    /// True when the migration is safe or safe in practice.
    pub fn is_safe(&self) -> bool {
        self.safe
    }

    /// The findings that make it unsafe.
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
    }

    /// The findings to act on that do not make it unsafe.
    pub fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Warning)
    }

    /// True when some finding applied `rule`.
    pub fn has(&self, rule: RuleId) -> bool {
        self.findings.iter().any(|f| f.rule == rule)
    }

    /// One line per error, with its remedy where the rule has one, for a VMM's refusal
    /// message.
    pub fn summary(&self) -> String {
        let errs: Vec<String> = self
            .errors()
            .map(|f| {
                format!(
                    "{}: {} [{}]{}",
                    f.disk.as_deref().unwrap_or("plan"),
                    f.message,
                    f.rule,
                    f.remedy
                        .as_ref()
                        .map(|r| format!("; remedy: {r}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        if errs.is_empty() {
            format!("storage is {}", self.verdict)
        } else {
            errs.join("; ")
        }
    }

    /// The report as a JSON value (the `--json` output).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }
}

/// Writes `text` wrapped at 100 columns, the first line after `first`, the others after
/// `rest`.
fn wrap(out: &mut fmt::Formatter<'_>, first: &str, rest: &str, text: &str) -> fmt::Result {
    const WIDTH: usize = 100;
    let mut prefix = first;
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && prefix.len() + line.len() + 1 + word.len() > WIDTH {
            writeln!(out, "{prefix}{line}")?;
            prefix = rest;
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        writeln!(out, "{prefix}{line}")?;
    }
    Ok(())
}

impl fmt::Display for Report {
    /// The human output: the verdict, then per disk what was looked at and each rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unsafe_disks = self
            .disks
            .iter()
            .filter(|d| d.verdict == Verdict::Unsafe)
            .count();
        let headline = match self.verdict {
            Verdict::Safe => "SAFE: every disk is coherent between the two hosts by guarantee.".to_string(),
            Verdict::SafeInPractice => "SAFE IN PRACTICE: safety rests on implementation behaviour, not on a protocol guarantee.".to_string(),
            Verdict::Unsafe => format!(
                "UNSAFE: {unsafe_disks} of {} disk(s) break a live-migration safety rule.",
                self.disks.len()
            ),
        };
        writeln!(f, "{headline}")?;
        if self.same_host {
            writeln!(f, "source and destination run on the same host")?;
        }
        let lv = &self.libvirt;
        let agree = if lv.agrees { "agrees" } else { "differs" };
        writeln!(
            f,
            "libvirt would say: {} ({agree}){}",
            lv.verdict,
            if lv.safe && !lv.safe_without_drop_cache {
                "; without QEMU's drop-cache (QEMU < 4.0 or libvirt < 5.7): unsafe"
            } else {
                ""
            }
        )?;
        for d in &self.disks {
            writeln!(f)?;
            let i = &d.inputs;
            writeln!(
                f,
                "disk {}: {}  {}",
                d.name,
                d.verdict,
                i.path.as_deref().unwrap_or("(no path)")
            )?;
            let mut parts = Vec::new();
            if let Some(s) = &i.storage {
                parts.push(format!("storage {}", s.describe()));
            }
            if !i.empty {
                parts.push(format!("cache {}", i.cache.describe()));
                parts.push(match &i.format {
                    Some(fm) => format!("format {}", fm.describe()),
                    None => "format unknown".to_string(),
                });
            }
            if let Some(e) = &i.nfs_export {
                parts.push(format!("export {}", e.describe()));
            }
            let flags: Vec<&str> = [
                (i.read_only, "read-only"),
                (i.shareable, "shareable"),
                (i.copied, "copied"),
                (i.online_resize, "online-resize"),
                (i.empty, "empty"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect();
            if !flags.is_empty() {
                parts.push(flags.join(", "));
            }
            wrap(f, "  ", "  ", &parts.join("; "))?;
            for detail in [
                i.storage
                    .as_ref()
                    .and_then(|s| s.detail.as_deref())
                    .filter(|_| {
                        i.storage
                            .as_ref()
                            .is_some_and(|s| s.origin == Origin::Detected)
                    }),
                i.format
                    .as_ref()
                    .and_then(|s| s.detail.as_deref())
                    .filter(|_| {
                        i.format
                            .as_ref()
                            .is_some_and(|s| s.origin == Origin::Detected)
                    }),
            ]
            .into_iter()
            .flatten()
            {
                wrap(f, "    detected: ", "              ", detail)?;
            }
            for fd in &d.findings {
                let label = match (fd.severity, fd.basis) {
                    (Severity::Info, None) => "note",
                    (s, _) => s.label(),
                };
                let head = format!("  {label:<7} ");
                wrap(
                    f,
                    &head,
                    "          ",
                    &format!("{}: {}", fd.rule, fd.message),
                )?;
                if fd.severity != Severity::Info {
                    if let Some(r) = &fd.remedy {
                        wrap(f, "          remedy: ", "                  ", r)?;
                    }
                    wrap(f, "          source: ", "                  ", fd.source)?;
                }
            }
            let l = &d.libvirt;
            wrap(
                f,
                "  ",
                "           ",
                &format!(
                    "libvirt: {} ({}): {}",
                    if l.safe { "safe" } else { "unsafe" },
                    serde_json::to_value(l.branch)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    l.message
                ),
            )?;
            if let Some(why) = &l.why_different {
                wrap(f, "           differs: ", "                    ", why)?;
            }
        }
        Ok(())
    }
}
