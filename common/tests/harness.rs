//! The test harness's own housekeeping: the state directories finished test runs leave.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use nexus_common::testing;

fn age(path: &std::path::Path, by: Duration) {
    let f = std::fs::File::open(path).unwrap();
    f.set_modified(SystemTime::now() - by).unwrap();
}

#[test]
fn state_older_than_the_age_is_swept_and_newer_state_is_kept() {
    let root = tempfile::tempdir().unwrap();
    let old_dir = root.path().join("broker_1_0_abc");
    let new_dir = root.path().join("broker_2_0_def");
    let old_file = root.path().join("stray");
    std::fs::create_dir_all(old_dir.join("nested")).unwrap();
    std::fs::write(old_dir.join("nested/state.seg"), b"x").unwrap();
    std::fs::create_dir_all(&new_dir).unwrap();
    std::fs::write(new_dir.join("state.seg"), b"y").unwrap();
    std::fs::write(&old_file, b"z").unwrap();
    age(&old_dir, Duration::from_secs(7200));
    age(&old_file, Duration::from_secs(7200));

    let removed = testing::sweep_older_than(root.path(), Duration::from_secs(3600));

    assert_eq!(removed, 2);
    assert!(
        !old_dir.exists(),
        "an old run's directory is removed with its files"
    );
    assert!(!old_file.exists());
    assert!(
        new_dir.join("state.seg").exists(),
        "a running test's state is kept"
    );
    // A second sweep finds nothing more, and a missing root is no error.
    assert_eq!(
        testing::sweep_older_than(root.path(), Duration::from_secs(3600)),
        0
    );
    assert_eq!(
        testing::sweep_older_than(&root.path().join("missing"), Duration::ZERO),
        0
    );
}
