//! Prepare, perform and finish against a real NBD server in this process, over unix
//! sockets: a full copy, an incremental one from a base, the refusals, the prelude.

use std::os::unix::fs::FileExt;

use super::*;
use migration_core::transport::{self, Listener};

const SIZE: u64 = 4 << 20;

fn image_with_data(path: &Path) {
    crate::virtio_blk::DiskImage::create_sparse(path, SIZE).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (off, len) in [(0u64, 100_000usize), (3 << 20, 4096)] {
        let data: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + off) as u8).collect();
        f.write_all_at(&data, off).unwrap();
    }
}

fn disk_request(base: Option<String>) -> PrepareRequest {
    PrepareRequest {
        disks: vec![DiskRequest {
            id: "disk0".into(),
            size: SIZE,
            base,
        }],
        new_base: None,
    }
}

fn settings() -> MirrorSettings {
    MirrorSettings {
        deadline: Duration::from_secs(20),
        ..MirrorSettings::default()
    }
}

#[test]
fn a_full_copy_creates_an_image_mirrors_into_it_and_finishes_equal() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    image_with_data(&src);
    let dst = dir.path().join("dst.img");
    let nbd = Address::Unix(dir.path().join("nbd.sock"));
    let mut target =
        StorageTarget::prepare(&disk_request(None), &[Some(dst.clone())], dir.path(), &nbd)
            .unwrap();
    let reply = target.reply();
    let disks = [SourceDisk {
        id: "disk0".into(),
        path: src.clone(),
        incremental: None,
    }];
    let mut source = StorageSource::start(&disks, &reply, &settings()).unwrap();
    source
        .wait_ready(Duration::from_secs(20), &mut |_| true)
        .unwrap();
    // A guest write after ready is mirrored too.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&[0xab; 512], 2 << 20).unwrap();
    source.handles()[0].note_write(2 << 20, 512);
    let rep = source.complete(false).unwrap();
    assert_eq!(rep.len(), 1);
    assert!(!rep[0].incremental);
    assert!(rep[0].bytes_copied >= 100_000 + 4096, "{rep:?}");
    assert_eq!(target.finish().unwrap(), vec![dst.clone()]);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
}

#[test]
fn an_incremental_copy_needs_the_older_copy_at_the_same_base() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.img");
    image_with_data(&old);
    let nbd = Address::Unix(dir.path().join("nbd.sock"));
    let base = [9u8; 16];
    // No base written beside the older copy: refused, and the image is left alone.
    let e = StorageTarget::prepare(
        &disk_request(Some(base_hex(base))),
        &[Some(old.clone())],
        dir.path(),
        &nbd,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no base") && e.contains("--copy-storage-all"),
        "{e}"
    );
    assert!(old.exists());
    // Another base: refused with both named.
    write_base(&old, [1; 16]).unwrap();
    let e = StorageTarget::prepare(
        &disk_request(Some(base_hex(base))),
        &[Some(old.clone())],
        dir.path(),
        &nbd,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&base_hex([1; 16])) && e.contains(&base_hex(base)),
        "{e}"
    );
    // The same base: served as kept, not created.
    write_base(&old, base).unwrap();
    let target = StorageTarget::prepare(
        &disk_request(Some(base_hex(base))),
        &[Some(old.clone())],
        dir.path(),
        &nbd,
    )
    .unwrap();
    match target.reply() {
        PrepareReply::Ready { exports, .. } => assert!(!exports[0].created),
        r => panic!("{r:?}"),
    }
    // An aborted incremental copy keeps the image but it is no base any more.
    let said = target.abort(false);
    assert!(old.exists(), "{said:?}");
    assert!(read_base(&old).is_none(), "{said:?}");
}

#[test]
fn an_incremental_copy_moves_only_the_clusters_written_since_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    image_with_data(&src);
    let old = dir.path().join("old.img");
    std::fs::copy(&src, &old).unwrap();
    let base = [4u8; 16];
    write_base(&old, base).unwrap();
    let g = MirrorSettings::default().granularity;
    let mut bitmap = PersistentBitmap::create(&bitmap_path(&src), SIZE, g, base).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&[0x5a; 8192], 1 << 20).unwrap();
    bitmap.mark(1 << 20, 8192);
    bitmap.close().unwrap();
    let (bits, granularity, b) = incremental_bitmap(&src, SIZE).unwrap();
    assert_eq!((granularity, b), (g, base));
    let nbd = Address::Unix(dir.path().join("nbd.sock"));
    let mut target = StorageTarget::prepare(
        &disk_request(Some(base_hex(base))),
        &[Some(old.clone())],
        dir.path(),
        &nbd,
    )
    .unwrap();
    let disks = [SourceDisk {
        id: "disk0".into(),
        path: src.clone(),
        incremental: Some((bits, base)),
    }];
    let mut source = StorageSource::start(&disks, &target.reply(), &settings()).unwrap();
    source
        .wait_ready(Duration::from_secs(20), &mut |_| true)
        .unwrap();
    let rep = source.complete(true).unwrap();
    assert_eq!(rep[0].bytes_copied + rep[0].bytes_zeroed, g, "{rep:?}");
    target.finish().unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&old).unwrap());
}

#[test]
fn a_full_copy_never_overwrites_an_image_and_an_abort_deletes_what_it_created() {
    let dir = tempfile::tempdir().unwrap();
    let there = dir.path().join("there.img");
    std::fs::write(&there, vec![1u8; 4096]).unwrap();
    let nbd = Address::Unix(dir.path().join("nbd.sock"));
    let e = StorageTarget::prepare(
        &disk_request(None),
        &[Some(there.clone())],
        dir.path(),
        &nbd,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("creating it for a full copy"), "{e}");
    assert_eq!(std::fs::read(&there).unwrap(), vec![1u8; 4096]);
    // Without a path of its own, the image goes into the scratch directory.
    let t = StorageTarget::prepare(&disk_request(None), &[None], dir.path(), &nbd).unwrap();
    let made = dir.path().join("disk0.img");
    assert_eq!(t.paths(), vec![made.clone()]);
    assert!(made.exists());
    let said = t.abort(false);
    assert!(!made.exists(), "{said:?}");
    assert!(said[0].contains("deleted"), "{said:?}");
    // More disks than the VM has, or an id that is not a plain name: refused, nothing
    // made.
    let mut two = disk_request(None);
    two.disks.push(DiskRequest {
        id: "disk1".into(),
        ..two.disks[0].clone()
    });
    let e = StorageTarget::prepare(&two, &[None], dir.path(), &nbd)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 disks asked for") && e.contains("has 1"),
        "{e}"
    );
    let mut bad = disk_request(None);
    bad.disks[0].id = "../escape".into();
    assert!(StorageTarget::prepare(&bad, &[None], dir.path(), &nbd).is_err());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["there.img"], "nothing else made");
}

#[test]
fn the_prelude_is_told_from_a_migration_stream_and_messages_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let addr = Address::Unix(dir.path().join("l.sock"));
    let l = Listener::bind(&addr).unwrap();
    // A migration stream's first bytes.
    let mut c = transport::connect(&addr).unwrap();
    c.write_all(b"\x7fMIGR-not-a-prelude").unwrap();
    let s = l.accept().unwrap();
    assert!(!is_prelude(&s, Duration::from_secs(5)).unwrap());
    // A prepare request, read whole after the look.
    let mut c = transport::connect(&addr).unwrap();
    let t = std::thread::spawn(move || super::request(&mut c, &disk_request(None)));
    let mut s = l.accept().unwrap();
    assert!(is_prelude(&s, Duration::from_secs(5)).unwrap());
    assert_eq!(read_request(&mut s).unwrap(), disk_request(None));
    let r = PrepareReply::Refused {
        reason: "no room".into(),
    };
    reply(&mut s, &r).unwrap();
    assert_eq!(t.join().unwrap().unwrap(), r);
    // A length past the bound is refused before anything is allocated.
    let mut c = transport::connect(&addr).unwrap();
    c.write_all(PRELUDE).unwrap();
    c.write_all(&(MAX_MESSAGE + 1).to_le_bytes()).unwrap();
    let mut s = l.accept().unwrap();
    let e = read_request(&mut s).unwrap_err().to_string();
    assert!(e.contains("more than"), "{e}");
    // A base that is not one is refused, not dropped.
    let mut c = transport::connect(&addr).unwrap();
    let bad = PrepareRequest {
        new_base: Some("not-a-base".into()),
        ..disk_request(None)
    };
    let t = std::thread::spawn(move || super::request(&mut c, &bad));
    let mut s = l.accept().unwrap();
    let e = read_request(&mut s).unwrap_err().to_string();
    assert!(
        e.contains("the new base") && e.contains("not-a-base"),
        "{e}"
    );
    drop(s);
    assert!(t.join().unwrap().is_err());
}

#[test]
fn bases_read_back_and_bad_ones_are_none() {
    let b = [0xde, 0xad, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 255];
    assert_eq!(parse_base(&base_hex(b)), Some(b));
    assert_eq!(parse_base("zz"), None);
    assert_eq!(parse_base(&"g".repeat(32)), None);
    assert_eq!(parse_base(&"é".repeat(16)), None);
}
