//! Records of the migration stream (source to destination).

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::batch::{self, PageBatch};
use super::error::PayloadError;
use super::wire::{RECORD_OVERHEAD, Reader, RecordType, begin_record, end_record, put_string};
use crate::layout::{LayoutError, RamLayout};
use crate::page::varint;

/// The guest's RAM layout and the VMM's own configuration, sent once before any page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Page size in bytes.
    pub page_size: u32,
    /// RAM regions as `(guest_base, size)` in bytes, in the order the source lists them.
    pub regions: Vec<(u64, u64)>,
    /// Whatever else the destination VMM needs to build a matching VM (vCPU count,
    /// machine type...), in a format of the VMM's choosing.
    pub vmm: Bytes,
}

impl Config {
    /// The config of `layout`, with the VMM's blob.
    ///
    /// # Panics
    /// If the layout's page size does not fit in a `u32`.
    pub fn from_layout(layout: &RamLayout, vmm: Bytes) -> Self {
        Config {
            page_size: u32::try_from(layout.page_size()).expect("page size above 4 GiB"),
            regions: layout
                .regions()
                .iter()
                .map(|r| (r.guest_base, r.size))
                .collect(),
            vmm,
        }
    }

    /// The RAM layout the config describes.
    pub fn layout(&self) -> Result<RamLayout, LayoutError> {
        RamLayout::new(self.page_size.into(), &self.regions)
    }
}

/// One device's (or vCPU's) saved state: who it belongs to, in which format, and the bytes.
///
/// It travels in one record, so it must fit the receiver's
/// [`DecoderOptions::max_record_len`](super::DecoderOptions::max_record_len) (64 MiB by
/// default); a VMM with larger device state raises that limit on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Stable identifier of the device, unique within the VM: `"vcpu0"`, `"pit"`, `"virtio-blk0"`.
    pub id: String,
    /// Version of the blob's format, so a newer destination can refuse or convert old state.
    pub version: u32,
    /// The state itself, opaque to the engine.
    pub data: Bytes,
}

impl DeviceState {
    /// A blob for device `id` in format `version`.
    pub fn new(id: impl Into<String>, version: u32, data: impl Into<Bytes>) -> Self {
        DeviceState {
            id: id.into(),
            version,
            data: data.into(),
        }
    }
}

/// What one pass of pre-copy sent, as the source saw it. Informational: the record is
/// skippable, and the destination uses it for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct IterationEnd {
    /// Pass number, from 0.
    pub iteration: u64,
    /// Pages sent as zero pages.
    pub zero_pages: u64,
    /// Pages sent raw.
    pub raw_pages: u64,
    /// Pages sent zstd-compressed.
    pub zstd_pages: u64,
    /// Pages sent as deltas.
    pub delta_pages: u64,
    /// Stream bytes the pass took.
    pub bytes: u64,
    /// Dirty pages left when the pass ended.
    pub dirty_pages_left: u64,
    /// Duration of the pass, in nanoseconds.
    pub duration_ns: u64,
    /// Bytes dirtied per second during the pass.
    pub dirty_rate: u64,
    /// Bytes sent per second during the pass.
    pub bandwidth: u64,
}

impl IterationEnd {
    fn fields(&self) -> [u64; 10] {
        [
            self.iteration,
            self.zero_pages,
            self.raw_pages,
            self.zstd_pages,
            self.delta_pages,
            self.bytes,
            self.dirty_pages_left,
            self.duration_ns,
            self.dirty_rate,
            self.bandwidth,
        ]
    }

    /// The wire summary of an engine's statistics for one pass.
    pub fn from_stats(s: &crate::stats::IterationStats) -> Self {
        IterationEnd {
            iteration: s.iteration as u64,
            zero_pages: s.pages.zero,
            raw_pages: s.pages.raw,
            zstd_pages: s.pages.zstd,
            delta_pages: s.pages.delta,
            bytes: s.bytes_on_wire,
            dirty_pages_left: s.dirty_pages_after,
            duration_ns: s.duration.as_nanos().min(u64::MAX as u128) as u64,
            dirty_rate: s.dirty_rate_bps as u64,
            bandwidth: s.bandwidth_bps as u64,
        }
    }

    fn from_fields(f: [u64; 10]) -> Self {
        IterationEnd {
            iteration: f[0],
            zero_pages: f[1],
            raw_pages: f[2],
            zstd_pages: f[3],
            delta_pages: f[4],
            bytes: f[5],
            dirty_pages_left: f[6],
            duration_ns: f[7],
            dirty_rate: f[8],
            bandwidth: f[9],
        }
    }
}

/// A record of the migration stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// RAM layout and VMM configuration.
    Config(Config),
    /// A batch of pages.
    PageBatch(PageBatch),
    /// One device's state.
    DeviceState(DeviceState),
    /// The end of a pre-copy pass.
    IterationEnd(IterationEnd),
    /// Pages the destination must discard before post-copy starts, when the list is too
    /// long for [`Record::SwitchToPostcopy`] alone.
    DiscardPages(Vec<Range<u64>>),
    /// The switch to post-copy: the destination discards these pages (they changed since
    /// they were sent), then runs the guest and requests missing pages as it faults.
    SwitchToPostcopy {
        /// Pages to discard, as ranges of page indices.
        discard: Vec<Range<u64>>,
    },
    /// All of RAM and the device state were sent, with the guest paused on the source:
    /// the destination checks what it has and answers with its verdict, but does not run
    /// the guest before `Complete`.
    EndOfData,
    /// The source's commit, sent once it has the destination's `Running` verdict: from now
    /// on the source never runs the guest again, and the destination may. A destination
    /// that does not get it never runs the guest, so the two never both run it. In
    /// post-copy, where the commit came earlier ([`Record::PostcopyCommit`]), it says that
    /// every page was sent.
    Complete,
    /// The post-copy commit, sent once the destination acknowledged the switch
    /// ([`Ack::PostcopyReady`](super::Ack::PostcopyReady)): from now on the source never
    /// runs the guest again, and the destination runs it while the pages it lacks follow.
    /// Sent again after a resumed connection (a commit lost with the connection is then
    /// taken up; a second one changes nothing).
    PostcopyCommit,
    /// The source gave up.
    Abort {
        /// Why.
        reason: String,
    },
}

impl Record {
    /// The record's type code.
    pub fn record_type(&self) -> RecordType {
        match self {
            Record::Config(_) => RecordType::CONFIG,
            Record::PageBatch(_) => RecordType::PAGE_BATCH,
            Record::DeviceState(_) => RecordType::DEVICE_STATE,
            Record::IterationEnd(_) => RecordType::ITERATION_END,
            Record::DiscardPages(_) => RecordType::DISCARD_PAGES,
            Record::SwitchToPostcopy { .. } => RecordType::SWITCH_TO_POSTCOPY,
            Record::EndOfData => RecordType::END_OF_DATA,
            Record::Complete => RecordType::COMPLETE,
            Record::Abort { .. } => RecordType::ABORT,
            Record::PostcopyCommit => RecordType::POSTCOPY_COMMIT,
        }
    }

    /// Whether the record ends the stream.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Record::Complete | Record::Abort { .. })
    }

    /// Appends the record.
    ///
    /// # Panics
    /// If the payload would reach 4 GiB, or for a page batch as
    /// [`PageBatchWriter`](super::PageBatchWriter) does.
    pub fn encode(&self, out: &mut BytesMut) {
        if let Record::PageBatch(b) = self {
            b.encode(out);
            return;
        }
        let start = begin_record(out, self.record_type());
        match self {
            Record::Config(c) => {
                out.put_u32_le(c.page_size);
                let n = u32::try_from(c.regions.len()).expect("over 4G RAM regions");
                out.put_u32_le(n);
                for &(base, size) in &c.regions {
                    out.put_u64_le(base);
                    out.put_u64_le(size);
                }
                let n = u32::try_from(c.vmm.len()).expect("VMM blob of 4 GiB or more");
                out.put_u32_le(n);
                out.extend_from_slice(&c.vmm);
            }
            Record::DeviceState(d) => {
                put_string(out, &d.id);
                out.put_u32_le(d.version);
                out.extend_from_slice(&d.data);
            }
            Record::IterationEnd(s) => {
                for f in s.fields() {
                    out.put_u64_le(f);
                }
            }
            Record::DiscardPages(ranges) | Record::SwitchToPostcopy { discard: ranges } => {
                put_ranges(out, ranges)
            }
            Record::EndOfData | Record::Complete | Record::PostcopyCommit => {}
            Record::Abort { reason } => put_string(out, reason),
            Record::PageBatch(_) => unreachable!("encoded above"),
        }
        end_record(out, start);
    }
}

/// Encoded size of one range.
fn range_len(r: &Range<u64>) -> usize {
    varint::len(r.start) + varint::len(r.end.saturating_sub(r.start))
}

/// Appends `ranges`: a `u32` count, then `start` and `count` varints.
///
/// # Panics
/// If a range is empty or reversed.
fn put_ranges(out: &mut BytesMut, ranges: &[Range<u64>]) {
    let n = u32::try_from(ranges.len()).expect("over 4G page ranges");
    out.put_u32_le(n);
    for r in ranges {
        assert!(r.start < r.end, "empty page range {r:?}");
        varint::push(out, r.start);
        varint::push(out, r.end - r.start);
    }
}

/// Reads `ranges`, each checked to be non-empty and to end within `page_count` pages.
pub(crate) fn get_ranges(
    r: &mut Reader<'_>,
    page_count: Option<u64>,
) -> Result<Vec<Range<u64>>, PayloadError> {
    // Each range takes at least two bytes.
    let n = r.count("page ranges", 2)?;
    let mut ranges = Vec::with_capacity(n);
    let limit = page_count.unwrap_or(u64::MAX);
    for _ in 0..n {
        let start = r.varint("range start")?;
        let count = r.varint("range length")?;
        if count == 0 {
            return Err(PayloadError::EmptyRange { start });
        }
        match start.checked_add(count) {
            Some(end) if end <= limit => ranges.push(start..end),
            _ => {
                return Err(PayloadError::RangeOutOfRange {
                    start,
                    count,
                    pages: limit,
                });
            }
        }
    }
    Ok(ranges)
}

/// Appends the switch to post-copy with its discard list, split into as many
/// [`Record::DiscardPages`] records as needed so that no payload exceeds
/// `max_payload` bytes (use the destination's
/// [`DecoderOptions::max_record_len`](super::DecoderOptions::max_record_len)), followed by
/// one [`Record::SwitchToPostcopy`]. Returns the number of records written.
///
/// # Panics
/// If a range is empty or reversed, or `max_payload` cannot hold even one range (it must
/// be at least 24 bytes).
pub fn write_postcopy_switch(
    out: &mut BytesMut,
    discard: &[Range<u64>],
    max_payload: u32,
) -> usize {
    const COUNT: usize = 4;
    let max = max_payload as usize;
    assert!(
        max >= COUNT + 2 * varint::MAX_LEN,
        "record limit too small for one range"
    );
    let mut records = 0;
    let mut rest = discard;
    loop {
        let mut size = COUNT;
        let mut n = 0;
        while n < rest.len() && size + range_len(&rest[n]) <= max {
            size += range_len(&rest[n]);
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        out.reserve(RECORD_OVERHEAD + size);
        let record_type = if tail.is_empty() {
            RecordType::SWITCH_TO_POSTCOPY
        } else {
            RecordType::DISCARD_PAGES
        };
        let start = begin_record(out, record_type);
        put_ranges(out, chunk);
        end_record(out, start);
        records += 1;
        if tail.is_empty() {
            return records;
        }
        rest = tail;
    }
}

/// What the migration decoder knows from earlier records.
#[derive(Debug, Default)]
pub(crate) struct Context {
    pub(crate) config_seen: bool,
    pub(crate) page_size: Option<u32>,
    pub(crate) page_count: Option<u64>,
}

/// Decodes a migration-stream payload; `Ok(None)` for a type this build does not know.
pub(crate) fn decode(
    record_type: RecordType,
    payload: &Bytes,
    ctx: &mut Context,
) -> Result<Option<Record>, PayloadError> {
    let mut r = Reader::new(payload);
    let record = match record_type {
        RecordType::CONFIG => {
            if ctx.config_seen {
                return Err(PayloadError::DuplicateConfig);
            }
            let page_size = r.u32("page size")?;
            let n = r.count("RAM regions", 16)?;
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                let base = r.u64("region base")?;
                let size = r.u64("region size")?;
                regions.push((base, size));
            }
            let blob_len = r.u32("VMM blob length")?;
            let vmm = r.bytes(blob_len as usize, "VMM blob")?;
            let config = Config {
                page_size,
                regions,
                vmm,
            };
            if !batch::valid_page_size(page_size) {
                return Err(PayloadError::BadPageSize(page_size));
            }
            let pages = config.layout()?.page_count() as u64;
            if let Some(expected) = ctx.page_count {
                if expected != pages {
                    return Err(PayloadError::PageCountMismatch {
                        got: pages,
                        expected,
                    });
                }
            }
            r.end()?;
            ctx.config_seen = true;
            ctx.page_size = Some(page_size);
            ctx.page_count = Some(pages);
            return Ok(Some(Record::Config(config)));
        }
        RecordType::PAGE_BATCH => {
            return batch::decode(payload, ctx.page_size, ctx.page_count)
                .map(|b| Some(Record::PageBatch(b)));
        }
        RecordType::DEVICE_STATE => {
            let id = r.string("device id")?;
            let version = r.u32("device state version")?;
            let data = r.rest();
            Record::DeviceState(DeviceState { id, version, data })
        }
        RecordType::ITERATION_END => {
            let mut f = [0u64; 10];
            for v in &mut f {
                *v = r.u64("iteration statistics")?;
            }
            Record::IterationEnd(IterationEnd::from_fields(f))
        }
        RecordType::DISCARD_PAGES => Record::DiscardPages(get_ranges(&mut r, ctx.page_count)?),
        RecordType::SWITCH_TO_POSTCOPY => Record::SwitchToPostcopy {
            discard: get_ranges(&mut r, ctx.page_count)?,
        },
        RecordType::END_OF_DATA => Record::EndOfData,
        RecordType::POSTCOPY_COMMIT => Record::PostcopyCommit,
        RecordType::COMPLETE => Record::Complete,
        RecordType::ABORT => Record::Abort {
            reason: r.string("abort reason")?,
        },
        _ => return Ok(None),
    };
    r.end()?;
    Ok(Some(record))
}
