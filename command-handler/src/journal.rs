//! The durable memory of request ids (`commands.journal_dir`, file `requests.jsonl`): a
//! command with a `request_id` is recorded as started before its first write reaches the
//! device, and with its answer once it is done, each record on disk (fdatasync) before the
//! handler goes on. After a restart a repeat of it (a requester's retry, or the broker's
//! redelivery of a command the handler had not acknowledged) is answered from the record and
//! never runs again: with the first answer, or, when the handler stopped while running it,
//! with "outcome unknown".
//!
//! One JSON object per line: `{"key", "at"}` when started, `{"key", "at", "answer"}` when
//! done (`at`: unix ms). A line cut short by a crash is skipped and counted. The file keeps
//! what is younger than `commands.dedup_window`; it is rewritten without the rest at start
//! and whenever it holds more than twice `commands.dedup_max_entries` lines (at most
//! `dedup_max_entries` keys are kept then, the newest).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value as Json};

use crate::handler::Response;

const FILE: &str = "requests.jsonl";

/// What the journal held for one key at start.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub key: String,
    /// When it was last recorded, unix ms.
    pub at: i64,
    /// `None`: started, never finished (the handler stopped while running it).
    pub answer: Option<Vec<Response>>,
}

/// What opening found.
#[derive(Debug, Default)]
pub struct Opened {
    /// Entries younger than the window, oldest first.
    pub entries: Vec<Recovered>,
    /// Lines that could not be read (a record cut short by a crash).
    pub unreadable: usize,
}

pub struct Journal {
    dir: PathBuf,
    window: Duration,
    max_keys: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    lines: usize,
}

fn answer_json(responses: &[Response]) -> Json {
    Json::Array(
        responses
            .iter()
            .map(|r| json!({"device": r.device, "tag": r.tag, "body": r.body}))
            .collect(),
    )
}

fn answer_from(v: &Json) -> Option<Vec<Response>> {
    v.as_array()?
        .iter()
        .map(|r| {
            Some(Response {
                device: r.get("device")?.as_str()?.to_owned(),
                tag: r.get("tag").and_then(Json::as_str).map(str::to_owned),
                body: r.get("body")?.clone(),
            })
        })
        .collect()
}

/// The live entries of the file at `path` (the last record of each key), oldest first.
fn read(path: &Path, window: Duration, max_keys: usize, now_ms: i64) -> std::io::Result<Opened> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Opened::default()),
        Err(e) => return Err(e),
    };
    let mut last: HashMap<String, Recovered> = HashMap::new();
    let mut unreadable = 0;
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        let rec = serde_json::from_slice::<Json>(&line).ok().and_then(|v| {
            let key = v.get("key")?.as_str()?.to_owned();
            let at = v.get("at")?.as_i64()?;
            let answer = match v.get("answer") {
                None => None,
                Some(a) => Some(answer_from(a)?),
            };
            Some(Recovered { key, at, answer })
        });
        match rec {
            Some(r) => {
                last.insert(r.key.clone(), r);
            }
            None => unreadable += 1,
        }
    }
    let cutoff = now_ms - window.as_millis() as i64;
    let mut entries: Vec<Recovered> = last.into_values().filter(|r| r.at > cutoff).collect();
    entries.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.key.cmp(&b.key)));
    if entries.len() > max_keys {
        entries.drain(..entries.len() - max_keys);
    }
    Ok(Opened {
        entries,
        unreadable,
    })
}

fn line(r: &Recovered) -> String {
    let mut v = json!({"key": r.key, "at": r.at});
    if let Some(a) = &r.answer {
        v["answer"] = answer_json(a);
    }
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// Write `entries` as the whole file, atomically (a temporary file, fsync, rename, fsync of
/// the directory), and open it for appending.
fn rewrite(dir: &Path, entries: &[Recovered]) -> std::io::Result<File> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        let mut text = String::new();
        for e in entries {
            text.push_str(&line(e));
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(FILE))?;
    File::open(dir)?.sync_all()?;
    OpenOptions::new().append(true).open(dir.join(FILE))
}

impl Journal {
    /// Open (or create) the journal in `dir`; what it holds younger than `window` comes back.
    pub fn open(
        dir: &Path,
        window: Duration,
        max_keys: usize,
        now_ms: i64,
    ) -> std::io::Result<(Journal, Opened)> {
        std::fs::create_dir_all(dir)?;
        let opened = read(&dir.join(FILE), window, max_keys.max(1), now_ms)?;
        let file = rewrite(dir, &opened.entries)?;
        let journal = Journal {
            dir: dir.to_owned(),
            window,
            max_keys: max_keys.max(1),
            inner: Mutex::new(Inner {
                file,
                lines: opened.entries.len(),
            }),
        };
        Ok((journal, opened))
    }

    fn append(&self, r: &Recovered, now_ms: i64) -> std::io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.file.write_all(line(r).as_bytes())?;
        inner.file.sync_data()?;
        inner.lines += 1;
        if inner.lines > 2 * self.max_keys {
            let path = self.dir.join(FILE);
            let live = read(&path, self.window, self.max_keys, now_ms)?;
            inner.file = rewrite(&self.dir, &live.entries)?;
            inner.lines = live.entries.len();
        }
        Ok(())
    }

    /// Record that the command `key` starts running (blocking: call off the async threads).
    pub fn started(&self, key: &str, now_ms: i64) -> std::io::Result<()> {
        self.append(
            &Recovered {
                key: key.to_owned(),
                at: now_ms,
                answer: None,
            },
            now_ms,
        )
    }

    /// Record the answer of `key` (blocking: call off the async threads).
    pub fn done(&self, key: &str, answer: &[Response], now_ms: i64) -> std::io::Result<()> {
        self.append(
            &Recovered {
                key: key.to_owned(),
                at: now_ms,
                answer: Some(answer.to_vec()),
            },
            now_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(device: &str, ok: bool) -> Response {
        Response {
            device: device.into(),
            tag: Some("sp".into()),
            body: json!({"success": ok, "request_id": "r"}),
        }
    }

    #[test]
    fn started_and_done_survive_a_reopen_and_old_entries_go() {
        let dir = tempfile::tempdir().unwrap();
        let w = Duration::from_secs(60);
        let t0 = 1_750_000_000_000;
        {
            let (j, o) = Journal::open(dir.path(), w, 100, t0).unwrap();
            assert!(o.entries.is_empty());
            j.started("old", t0).unwrap();
            j.started("a", t0 + 50_000).unwrap();
            j.done("a", &[resp("plc", true)], t0 + 50_010).unwrap();
            j.started("b", t0 + 55_000).unwrap();
        }
        // A record cut short by a crash at the end of the file.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(br#"{"key":"c","at":17500"#).unwrap();
        drop(f);
        let (_j, o) = Journal::open(dir.path(), w, 100, t0 + 61_000).unwrap();
        assert_eq!(o.unreadable, 1);
        let keys: Vec<_> = o.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["a", "b"], "'old' is past the window");
        let a = o.entries[0].answer.as_ref().unwrap();
        assert_eq!(a[0].device, "plc");
        assert_eq!(a[0].tag.as_deref(), Some("sp"));
        assert_eq!(a[0].body["success"], true);
        assert!(o.entries[1].answer.is_none(), "started, never done");
        // The rewrite kept only the live entries, and the cut line is gone.
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn the_file_is_bounded_by_the_newest_keys() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_750_000_000_000;
        let (j, _) = Journal::open(dir.path(), Duration::from_secs(3600), 10, t0).unwrap();
        for i in 0..100 {
            j.started(&format!("k{i}"), t0 + i).unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.lines().count() <= 21, "{}", text.lines().count());
        drop(j);
        let (_j, o) = Journal::open(dir.path(), Duration::from_secs(3600), 10, t0 + 200).unwrap();
        let keys: Vec<_> = o.entries.iter().map(|e| e.key.clone()).collect();
        assert_eq!(keys.len(), 10);
        assert_eq!(keys.last().unwrap(), "k99");
        assert_eq!(keys.first().unwrap(), "k90");
    }
}
