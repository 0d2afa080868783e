//! Alarm states on disk (`alerts.state_dir`, file `alarms.json`): the same retained payloads the
//! service publishes on `$nexus/alarms/<topic>/<rule>`, written after each batch of changes
//! (a temporary file, fsync, rename, fsync of the directory), and read back at start before
//! anything else. So a restart restores acknowledgements, shelving and out-of-service even
//! when the broker lost its retained messages, and independently of the order in which a
//! persistent session delivers what was published meanwhile.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "alarms.json";

pub struct StateFile {
    dir: PathBuf,
}

/// What the file held: state topic -> retained payload (JSON text).
pub type States = BTreeMap<String, String>;

impl StateFile {
    /// The file in `dir` (created when missing).
    pub fn open(dir: &Path) -> std::io::Result<StateFile> {
        std::fs::create_dir_all(dir)?;
        Ok(StateFile {
            dir: dir.to_owned(),
        })
    }

    /// The states of the last save; none when the file does not exist yet.
    pub fn load(&self) -> std::io::Result<Option<States>> {
        let text = match std::fs::read_to_string(self.dir.join(FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", self.dir.join(FILE).display()),
            )
        })?;
        let states = v
            .get("states")
            .and_then(|s| s.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(states))
    }

    /// Replace the file with `states`, atomically.
    pub fn save(&self, states: &States) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let body = serde_json::json!({"version": 1, "states": states}).to_string();
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(FILE))?;
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_states_load_back_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::open(&dir.path().join("alerts")).unwrap();
        assert!(f.load().unwrap().is_none());
        let mut s = States::new();
        s.insert(
            "$nexus/alarms/a/b/hot".into(),
            r#"{"state":"active_acked"}"#.into(),
        );
        f.save(&s).unwrap();
        assert_eq!(f.load().unwrap().unwrap(), s);
        s.clear();
        f.save(&s).unwrap();
        assert!(f.load().unwrap().unwrap().is_empty());
        // A damaged file is an error naming it, not an empty state.
        std::fs::write(dir.path().join("alerts").join(FILE), "{\"states\":").unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("alarms.json"), "{e}");
    }
}
