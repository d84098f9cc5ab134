//! The built `migration-storage-policy` binary: exit statuses, JSON shape, human output,
//! plan files and bad input.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_migration-storage-policy"))
        .args(args)
        .output()
        .expect("run migration-storage-policy")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// The fields the issue promises, with their types.
fn assert_shape(v: &Value) {
    assert!(v["safe"].is_boolean(), "{v}");
    let verdict = v["verdict"].as_str().unwrap();
    assert!(
        ["safe", "safe-in-practice", "unsafe"].contains(&verdict),
        "{verdict}"
    );
    assert_eq!(v["safe"].as_bool().unwrap(), verdict != "unsafe");
    let lv = &v["libvirt"];
    assert!(
        lv["safe"].is_boolean() && lv["message"].is_string() && lv["agrees"].is_boolean(),
        "{lv}"
    );
    assert!(["safe", "unsafe"].contains(&lv["verdict"].as_str().unwrap()));
    let findings = v["findings"].as_array().unwrap();
    assert!(!findings.is_empty());
    for f in findings {
        assert!(
            f["rule"].is_string() && f["message"].is_string() && f["source"].is_string(),
            "{f}"
        );
        assert!(
            ["info", "warning", "error"].contains(&f["severity"].as_str().unwrap()),
            "{f}"
        );
        assert!(
            f["remedy"].is_string() || (f["remedy"].is_null() && f["severity"] == "info"),
            "{f}"
        );
        assert!(f.get("remedy").is_some());
    }
    assert!(v["disks"].as_array().is_some_and(|d| !d.is_empty()));
}

#[test]
fn safe_exits_0() {
    let o = run(&[
        "check",
        "--storage",
        "gfs2",
        "--cache",
        "writeback",
        "--format",
        "raw",
    ]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("SAFE:"), "{}", stdout(&o));
    assert!(stdout(&o).contains("cluster-filesystem"));

    let o = run(&[
        "check",
        "--storage",
        "nfs",
        "--cache",
        "none",
        "--format",
        "qcow2",
        "--nfs-export",
        "sync",
        "--json",
    ]);
    assert_eq!(code(&o), 0);
    let v = json(&o);
    assert_shape(&v);
    assert_eq!(v["verdict"], "safe-in-practice");
    assert_eq!(v["safe"], true);
    assert_eq!(v["libvirt"]["safe"], true);
    assert_eq!(v["libvirt"]["agrees"], true);
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["rule"] == "nfs-o-direct" && f["basis"] == "practice")
    );
}

#[test]
fn unsafe_exits_1_and_explains() {
    let o = run(&["check", "--storage", "nfs", "--format", "raw"]);
    assert_eq!(code(&o), 1);
    let out = stdout(&o);
    assert!(out.starts_with("UNSAFE:"), "{out}");
    for needle in [
        "nfs-o-direct",
        "remedy: use cache=none",
        "source: QEMU wiki",
        "cache writeback (default)",
        "libvirt",
        "differs",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }

    let o = run(&[
        "check",
        "--storage",
        "local",
        "--cache",
        "none",
        "--format",
        "qcow2",
        "--json",
    ]);
    assert_eq!(code(&o), 1);
    let v = json(&o);
    assert_shape(&v);
    assert_eq!(v["safe"], false);
    assert_eq!(v["verdict"], "unsafe");
    assert_eq!(v["libvirt"]["safe"], false);
    let f = &v["findings"][0];
    assert_eq!(f["rule"], "local-storage-not-shared");
    assert_eq!(f["severity"], "error");
    assert_eq!(f["disk"], "disk0");

    // Copying the disk makes it safe; flags reach the plan.
    let o = run(&[
        "check",
        "--storage",
        "local",
        "--format",
        "qcow2",
        "--copy-storage",
        "--name",
        "vdb",
        "--json",
    ]);
    assert_eq!(code(&o), 0);
    assert_eq!(json(&o)["findings"][0]["rule"], "copied-disk");
    assert_eq!(json(&o)["disks"][0]["name"], "vdb");
    let o = run(&[
        "check",
        "--storage",
        "gfs2",
        "--format",
        "raw",
        "--online-resize",
    ]);
    assert_eq!(code(&o), 1);
    let o = run(&[
        "check",
        "--storage",
        "gfs2",
        "--format",
        "qcow2",
        "--shareable",
    ]);
    assert_eq!(code(&o), 1);
    let o = run(&[
        "check",
        "--storage",
        "nfs",
        "--format",
        "raw",
        "--read-only",
    ]);
    assert_eq!(code(&o), 0);
    let o = run(&[
        "check",
        "--storage",
        "nfs",
        "--cache",
        "none",
        "--format",
        "raw",
        "--nfs-export",
        "async",
    ]);
    assert_eq!(code(&o), 1);
}

#[test]
fn bad_input_exits_2_naming_it() {
    let cases: &[(&[&str], &str)] = &[
        (&["check", "--storage", "floppynet"], "floppynet"),
        (
            &["check", "--storage", "nfs", "--cache", "sometimes"],
            "sometimes",
        ),
        (&["check", "--storage", "nfs", "--format", "vmdk"], "vmdk"),
        (
            &["check", "--storage", "nfs", "--nfs-export", "maybe"],
            "maybe",
        ),
        (&["check"], "neither a path nor a storage kind"),
        (
            &["check", "--path", "/nonexistent-dir-for-test/vm.qcow2"],
            "/nonexistent-dir-for-test/vm.qcow2",
        ),
        (&["check", "--path", "ssh://h/img"], "ssh"),
        (
            &["check", "--plan", "/nonexistent-dir-for-test/plan.toml"],
            "/nonexistent-dir-for-test/plan.toml",
        ),
        (
            &["check", "--plan", "x.toml", "--storage", "nfs"],
            "cannot be used with",
        ),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        let o = run(args);
        assert_eq!(code(&o), 2, "{args:?}: {}{}", stdout(&o), stderr(&o));
        assert!(
            stderr(&o).contains(needle),
            "{args:?}: stderr lacks {needle:?}: {}",
            stderr(&o)
        );
    }
    // With --json, our own errors are also one JSON object on stdout.
    let o = run(&[
        "check",
        "--path",
        "/nonexistent-dir-for-test/vm.qcow2",
        "--json",
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        json(&o)["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent-dir-for-test/vm.qcow2")
    );
}

#[test]
fn bad_plan_files_exit_2_naming_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let cases = [
        (write("syntax.toml", "[[disk]\nname = "), "syntax.toml"),
        (
            write(
                "field.toml",
                "[[disk]]\nname = \"a\"\nstorage = \"nfs\"\ncahce = \"none\"\n",
            ),
            "cahce",
        ),
        (
            write("kind.toml", "[[disk]]\nname = \"a\"\nstorage = \"tape\"\n"),
            "tape",
        ),
        (write("empty.toml", "[source]\nname = \"a\"\n"), "no disks"),
    ];
    for (file, needle) in cases {
        let o = run(&["check", "--plan", &file]);
        assert_eq!(code(&o), 2, "{file}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{file}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&file),
            "the file is named: {}",
            stderr(&o)
        );
    }
    let big = write("big.toml", &"#".repeat(2 << 20));
    let o = run(&["check", "--plan", &big]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("more than"), "{}", stderr(&o));
}

#[test]
fn plan_with_several_disks_and_two_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.img");
    std::fs::write(&img, vec![0u8; 1024]).unwrap();
    let plan = format!(
        r#"
[source]
name = "host-a"
addresses = ["10.0.0.1"]

[destination]
name = "host-b"

[[disk]]
name = "root"
path = "{img}"
storage = "nfs"
cache = "none"
nfs_export = "sync"
server = "10.0.0.1"

[[disk]]
name = "data"
path = "/gfs/data.qcow2"
destination_path = "/mnt/gfs/data.qcow2"
storage = "gfs2"
format = "qcow2"

[[disk]]
name = "cdrom"
empty = true

[[disk]]
name = "scratch"
path = "rbd:pool/scratch"
cache = "writeback"
format = "raw"
"#,
        img = img.display()
    );
    let file = dir.path().join("vm.toml");
    std::fs::write(&file, plan).unwrap();
    let file = file.display().to_string();

    let o = run(&["check", "--plan", &file, "--json"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let v = json(&o);
    assert_shape(&v);
    assert_eq!(v["verdict"], "safe-in-practice");
    let disks = v["disks"].as_array().unwrap();
    let names: Vec<&str> = disks.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["root", "data", "cdrom", "scratch"]);
    let by = |name: &str| disks.iter().find(|d| d["name"] == name).unwrap();
    assert_eq!(by("root")["verdict"], "safe-in-practice");
    assert_eq!(by("root")["inputs"]["format"]["origin"], "detected");
    assert_eq!(by("data")["verdict"], "safe");
    assert_eq!(by("cdrom")["verdict"], "safe");
    assert_eq!(by("scratch")["inputs"]["storage"]["value"], "rbd");
    assert_eq!(by("scratch")["inputs"]["storage"]["origin"], "detected");
    let finding = |disk: &str, rule: &str| {
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["disk"] == disk && f["rule"] == rule)
            .unwrap_or_else(|| panic!("no {rule} for {disk}"))
            .clone()
    };
    assert_eq!(
        finding("root", "storage-not-on-migration-hosts")["severity"],
        "warning"
    );
    assert!(
        finding("root", "storage-not-on-migration-hosts")["message"]
            .as_str()
            .unwrap()
            .contains("host-a")
    );
    assert_eq!(
        finding("data", "same-path-on-both-hosts")["severity"],
        "warning"
    );
    assert_eq!(
        finding("root", "same-path-on-both-hosts")["severity"],
        "info"
    );
    assert_eq!(v["source"]["name"], "host-a");

    // The human form of the same plan.
    let o = run(&["check", "--plan", &file]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    for d in ["disk root:", "disk data:", "disk cdrom:", "disk scratch:"] {
        assert!(out.contains(d), "{out}");
    }
    assert!(out.starts_with("SAFE IN PRACTICE"), "{out}");
}

#[test]
fn detection_from_a_real_path() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    // A minimal qcow2 v3 header is enough for detection; no qemu-img needed here.
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    std::fs::write(&img, h).unwrap();
    let p = img.display().to_string();
    let o = run(&["check", "--path", &p, "--json"]);
    let v = json(&o);
    let inputs = &v["disks"][0]["inputs"];
    assert_eq!(inputs["format"]["value"], "qcow2");
    assert_eq!(inputs["format"]["origin"], "detected");
    assert_eq!(inputs["storage"]["origin"], "detected");
    // Whatever the temp dir is on, the filesystem was found by walking statfs.
    assert!(inputs["filesystem"]["magic"].is_u64());
    assert!(Path::new(inputs["filesystem"]["probed_path"].as_str().unwrap()).exists());
    if inputs["storage"]["value"] == "local" {
        assert_eq!(code(&o), 1, "a local qcow2 with no copy is unsafe");
    } else {
        assert!(matches!(code(&o), 0 | 1), "{}", stderr(&o));
    }
}

#[test]
fn rules_lists_every_rule() {
    let o = run(&["rules", "--json"]);
    assert_eq!(code(&o), 0);
    let v = json(&o);
    let rules = v.as_array().unwrap();
    assert_eq!(rules.len(), migration_storage_policy::RuleId::ALL.len());
    for r in rules {
        for k in ["id", "title", "source", "reasoning"] {
            assert!(r[k].as_str().is_some_and(|s| !s.is_empty()), "{r}");
        }
    }
    let o = run(&["rules"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("nfs-o-direct:"));
    assert_eq!(code(&run(&["--help"])), 0);
}

#[test]
fn same_host_makes_a_local_file_safe() {
    let o = run(&[
        "check",
        "--storage",
        "local",
        "--format",
        "raw",
        "--same-host",
        "--json",
    ]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let v = json(&o);
    assert_shape(&v);
    assert_eq!(v["same_host"], true);
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["rule"] == "same-host-local-file"),
        "{v}"
    );
    let o = run(&[
        "check",
        "--storage",
        "local",
        "--format",
        "raw",
        "--same-host",
    ]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("same host"), "{}", stdout(&o));
    // Without the flag the same disk is refused.
    assert_eq!(
        code(&run(&["check", "--storage", "local", "--format", "raw"])),
        1
    );
}
