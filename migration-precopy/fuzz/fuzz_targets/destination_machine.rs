//! The destination's state machine on an arbitrary migration stream (behind a valid header
//! and config when the first byte says so), fed in pieces whose size the input chooses: it
//! must end without panicking, and never resume a guest the stream did not complete.
#![no_main]

use std::time::Instant;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migration_core::RamLayout;
use migration_core::stats::PageCounts;
use migration_core::stream::{Config, Direction, Record, StreamHeader};
use migration_precopy::{
    DestinationAction, DestinationEvent, DestinationMachine, DestinationOptions,
};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let layout = RamLayout::new(4096, &[(0, 16 * 4096)]).expect("a layout");
    let mut stream = BytesMut::new();
    if ctl & 1 == 1 {
        StreamHeader::new([1; 16]).encode(Direction::Migration, &mut stream);
        Record::Config(Config::from_layout(&layout, Default::default())).encode(&mut stream);
    }
    stream.extend_from_slice(data);
    let chunk = usize::from(ctl >> 1).max(1);
    let t0 = Instant::now();
    let mut m = DestinationMachine::new(&DestinationOptions::default(), t0);
    let mut input = BytesMut::new();
    let mut pos = 0;
    let mut resumed = false;
    loop {
        match m.poll(&mut input, t0) {
            DestinationAction::NeedInput if pos < stream.len() => {
                let end = (pos + chunk).min(stream.len());
                input.extend_from_slice(&stream[pos..end]);
                m.handle(DestinationEvent::Received(end - pos), t0);
                pos = end;
            }
            DestinationAction::NeedInput => m.handle(DestinationEvent::Eof, t0),
            DestinationAction::Transmit => {
                let _ = m.take_transmit();
                m.handle(DestinationEvent::Transmitted(Ok(())), t0);
            }
            DestinationAction::Configured => {
                m.begin(&layout);
            }
            DestinationAction::PlacePages(b) => {
                assert!(
                    b.pages.iter().all(|p| p.index < 16),
                    "a page outside RAM got through"
                );
                let counts = PageCounts {
                    raw: b.pages.len() as u64,
                    ..Default::default()
                };
                m.handle(DestinationEvent::PagesPlaced(Ok(counts)), t0);
            }
            DestinationAction::PassEnded => {}
            DestinationAction::FinishRam => m.handle(DestinationEvent::RamFinished(Ok(())), t0),
            DestinationAction::LoadDeviceState => {
                m.handle(DestinationEvent::StateLoaded(Ok(())), t0)
            }
            DestinationAction::Verify => m.handle(DestinationEvent::Verified(Ok(())), t0),
            DestinationAction::Resume => {
                resumed = true;
                m.handle(DestinationEvent::Resumed(Ok(())), t0)
            }
            DestinationAction::Shutdown(_) => {}
            DestinationAction::Done => {
                let r = m.take_result().expect("a result at the end");
                assert_eq!(
                    r.is_ok(),
                    resumed,
                    "resumed without success, or the reverse"
                );
                return;
            }
            _ => {}
        }
    }
});
