//! Every SQL query of the Grafana dashboards (`deploy/grafana/dashboards/*.json`) runs against
//! a historian the services made, and answers:
//!
//! * the schema is the services' own: ingestion (run as a service, fed through the embedded
//!   broker), the alert journal's writer and the command audit's writer; the rest of a few
//!   days of history is added with SQL in the same tables, the aggregates refreshed where
//!   TimescaleDB materialises them, and the tables analysed;
//! * every panel target and template variable on the historian datasource is expanded the
//!   way Grafana expands it (the frontend's template variables, then the PostgreSQL
//!   datasource's `$__interval`/`$__interval_ms` and macros), run as the read-only role of
//!   docs/grafana.md with only its grants (and as the role deploy/compose makes), and must
//!   return rows. A variable, format or macro this file does not know fails the test, so no
//!   dashboard brings an unchecked one in;
//! * the tag explorer's query picks raw points, the 1-minute, 1-hour or 1-day aggregate by
//!   the range as the history API's `agg=auto` does, and its plan reads the raw points
//!   through the `(tag_id, time)` index, never a sequential scan of `points` (on
//!   TimescaleDB, but for the real-time aggregates' tail: see the test);
//! * the Prometheus panels name only metrics the services register, and every panel names
//!   one of the two provisioned datasources.
//!
//! Runs on plain PostgreSQL (CI), and on TimescaleDB where the harness finds it.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nexus_alert_service::engine::Change;
use nexus_alert_service::journal::JournalRow;
use nexus_alert_service::state::{Alarm, Event, State};
use nexus_command_handler::audit::AuditRecord;
use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::pg::Database;
use nexus_common::testing::{self, free_port, PgServer};
use nexus_common::Value;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

const HISTORIAN_UID: &str = "nexus-historian";
const PROMETHEUS_UID: &str = "nexus-prometheus";
/// The read-only role of docs/grafana.md, with the grants listed there.
const READER: &str = "nexus_grafana";
const GRANTS: &str = "
    CREATE ROLE nexus_grafana LOGIN;
    GRANT CONNECT ON DATABASE historian TO nexus_grafana;
    GRANT USAGE ON SCHEMA public TO nexus_grafana;
    GRANT SELECT ON metrics, metrics_1min, metrics_1hour, metrics_1day, tags, ingest_rejects,
                    alarm_events, command_audit TO nexus_grafana;
    ALTER ROLE nexus_grafana SET default_transaction_read_only = on;
    ALTER ROLE nexus_grafana SET statement_timeout = '30s';";

/// The role k8s/base/initdb/10-grafana-reader.sh makes before Nexus made its tables.
const DEFAULT_READER: &str = "nexus_grafana_default";
const DEFAULT_PRIVILEGES: &str = "
    CREATE ROLE nexus_grafana_default LOGIN;
    GRANT CONNECT ON DATABASE historian TO nexus_grafana_default;
    GRANT USAGE ON SCHEMA public TO nexus_grafana_default;
    ALTER DEFAULT PRIVILEGES FOR ROLE nexus IN SCHEMA public
        GRANT SELECT ON TABLES TO nexus_grafana_default;
    ALTER ROLE nexus_grafana_default SET default_transaction_read_only = on;
    ALTER ROLE nexus_grafana_default SET statement_timeout = '30s';";

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

// ------------------------------------------------------------------------------------------
// Grafana's expansion of a query: template variables (frontend), then the SQL datasource's
// global substitutions and the PostgreSQL macros (backend).

/// The time range and interval Grafana sends with a panel's query.
#[derive(Debug, Clone, Copy)]
struct Range {
    from_ms: i64,
    to_ms: i64,
    interval_ms: i64,
}

impl Range {
    /// `now-<n><unit>` to `now`, with the interval of a panel 1,000 points wide.
    fn last(width_ms: i64, now_ms: i64) -> Range {
        Range {
            from_ms: now_ms - width_ms,
            to_ms: now_ms,
            interval_ms: round_interval(width_ms / 1000),
        }
    }
}

/// A template variable's current value: `multi` when the variable allows several values or
/// All (Grafana then quotes each value).
#[derive(Debug, Clone)]
struct Var {
    values: Vec<String>,
    multi: bool,
}

/// A round interval near `ms`, like the one Grafana picks for a panel (its exact steps do not
/// matter here: the queries must answer for any).
fn round_interval(ms: i64) -> i64 {
    const STEPS: [(i64, i64); 16] = [
        (1_500, 1_000),
        (3_500, 2_000),
        (7_500, 5_000),
        (12_500, 10_000),
        (17_500, 15_000),
        (25_000, 20_000),
        (45_000, 30_000),
        (90_000, MINUTE),
        (210_000, 2 * MINUTE),
        (450_000, 5 * MINUTE),
        (750_000, 10 * MINUTE),
        (1_050_000, 15 * MINUTE),
        (1_500_000, 20 * MINUTE),
        (2_700_000, 30 * MINUTE),
        (5_400_000, HOUR),
        (9_000_000, 2 * HOUR),
    ];
    if ms < 1_000 {
        return ms.max(1);
    }
    for (below, step) in STEPS {
        if ms <= below {
            return step;
        }
    }
    match ms {
        m if m <= 16_200_000 => 3 * HOUR,
        m if m <= 32_400_000 => 6 * HOUR,
        m if m <= 86_400_000 => 12 * HOUR,
        m if m <= 604_800_000 => DAY,
        m if m <= 1_814_400_000 => 7 * DAY,
        m if m < 3_628_800_000 => 30 * DAY,
        _ => 365 * DAY,
    }
}

/// Go's `gtime.FormatInterval`, which Grafana uses for `$__interval`.
fn format_interval(ms: i64) -> String {
    const YEAR: i64 = 365 * DAY;
    match ms {
        m if m >= YEAR => format!("{}y", m / YEAR),
        m if m >= DAY => format!("{}d", m / DAY),
        m if m >= HOUR => format!("{}h", m / HOUR),
        m if m >= MINUTE => format!("{}m", m / MINUTE),
        m if m >= 1000 => format!("{}s", m / 1000),
        m if m >= 1 => format!("{m}ms"),
        _ => "1ms".into(),
    }
}

/// Go's `gtime.ParseInterval` for what dashboards write (`1m`, `30s`, `1h30m`, `1d`, `2w`,
/// `1y`, `500ms`), in seconds.
fn parse_interval(text: &str) -> Result<f64, String> {
    let text = text.trim().trim_matches('\'');
    let bad = || format!("error parsing interval {text}");
    let mut total = 0.0;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "w" => 7.0 * 86_400.0,
            "y" => 365.0 * 86_400.0,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// A float as Go's `%v` prints it.
fn go_float(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    // %v is %g with the shortest precision, which uses an exponent below 1e-4 and from 1e6.
    let exp = v.abs().log10().floor() as i32;
    if (-4..6).contains(&exp) {
        return format!("{v}");
    }
    let s = format!("{v:e}");
    let (mantissa, e) = s.split_once('e').unwrap();
    let e: i32 = e.parse().unwrap();
    format!("{mantissa}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
}

/// Unix milliseconds as Go's `time.RFC3339Nano` in UTC (trailing zeros of the fraction cut).
fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let frac = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    );
    if frac != 0 {
        let f = format!(".{frac:03}");
        out.push_str(f.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// A single value as Grafana's SQL datasources interpolate it without a format: a variable
/// with one value has its quotes doubled and is not quoted; one that may hold several (multi
/// or All) gives each value quoted, separated by commas.
fn sql_default_format(var: &Var) -> String {
    if var.multi {
        var.values
            .iter()
            .map(|v| format!("'{}'", v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        var.values
            .first()
            .cloned()
            .unwrap_or_default()
            .replace('\'', "''")
    }
}

/// `${var:sqlstring}`: each value quoted, `'` doubled and `"` escaped with a backslash (as
/// Grafana's format registry does), separated by commas.
fn sqlstring_format(var: &Var) -> String {
    var.values
        .iter()
        .map(|v| format!("'{}'", v.replace('\'', "''").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(",")
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The frontend's template step: `$var`, `${var}`, `${var:format}` and `[[var]]` of the
/// dashboard's variables, and the panel's `$__interval` and `$__interval_ms`. Names starting
/// with `__` that are not those are left for the backend's macros; any other name fails.
fn replace_variables(
    sql: &str,
    range: &Range,
    vars: &BTreeMap<String, Var>,
) -> Result<String, String> {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    loop {
        let next = match (rest.find('$'), rest.find("[[")) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => break,
        };
        out.push_str(&rest[..next]);
        rest = &rest[next..];
        // (name, format, length of the reference)
        let (name, format, len) = if let Some(inner) = rest.strip_prefix("[[") {
            let end = inner.find("]]").ok_or("unclosed [[")?;
            let (n, f) = inner[..end].split_once(':').unwrap_or((&inner[..end], ""));
            (n.to_owned(), f.to_owned(), end + 4)
        } else if let Some(inner) = rest.strip_prefix("${") {
            let end = inner.find('}').ok_or("unclosed ${")?;
            let (n, f) = inner[..end].split_once(':').unwrap_or((&inner[..end], ""));
            (n.to_owned(), f.to_owned(), end + 3)
        } else {
            let n: String = rest[1..].chars().take_while(|&c| is_word(c)).collect();
            if n.is_empty() {
                return Err(format!("a lone $ in {:?}", &rest[..rest.len().min(20)]));
            }
            let len = n.len() + 1;
            (n, String::new(), len)
        };
        let value = if let Some(var) = vars.get(&name) {
            match format.as_str() {
                "" => sql_default_format(var),
                "sqlstring" => sqlstring_format(var),
                "raw" | "csv" => var.values.join(","),
                f => {
                    return Err(format!(
                        "format {f:?} of ${{{name}}} is not checked by this test"
                    ))
                }
            }
        } else if !format.is_empty() {
            return Err(format!("unknown variable ${{{name}:{format}}}"));
        } else if name == "__interval_ms" {
            range.interval_ms.to_string()
        } else if name == "__interval" {
            format_interval(range.interval_ms)
        } else if name.starts_with("__") {
            // A macro or a backend substitution: the next steps know it or fail.
            rest[..len].to_owned()
        } else {
            return Err(format!("unknown template variable ${name}"));
        };
        out.push_str(&value);
        rest = &rest[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// One PostgreSQL macro as `pkg/tsdb/grafana-postgresql-datasource/macros.go` expands it.
fn macro_value(
    name: &str,
    args: &[String],
    range: &Range,
    timescaledb: bool,
) -> Result<String, String> {
    let from = format!("'{}'", rfc3339(range.from_ms));
    let to = format!("'{}'", rfc3339(range.to_ms));
    let (from_s, to_s) = (range.from_ms.div_euclid(1000), range.to_ms.div_euclid(1000));
    let col = || {
        args.first()
            .filter(|a| !a.is_empty())
            .cloned()
            .ok_or(format!("missing time column argument for macro {name}"))
    };
    let group = |epoch: bool| -> Result<String, String> {
        if args.len() < 2 {
            return Err(format!(
                "macro {name} needs time column and interval and optional fill value"
            ));
        }
        let secs = parse_interval(&args[1])?;
        if args.len() == 3 && !["NULL", "previous"].contains(&args[2].as_str()) {
            args[2]
                .parse::<f64>()
                .map_err(|_| format!("error parsing fill value {}", args[2]))?;
        }
        Ok(if epoch {
            format!("floor(({})/{})*{}", args[0], go_float(secs), go_float(secs))
        } else if timescaledb {
            format!("time_bucket('{secs:.3}s',{})", args[0])
        } else {
            format!(
                "floor(extract(epoch from {})/{})*{}",
                args[0],
                go_float(secs),
                go_float(secs)
            )
        })
    };
    Ok(match name {
        "__time" => format!("{} AS \"time\"", col()?),
        "__timeEpoch" => format!("extract(epoch from {}) as \"time\"", col()?),
        "__timeFilter" => format!("{} BETWEEN {from} AND {to}", col()?),
        "__timeFrom" => from,
        "__timeTo" => to,
        "__timeGroup" => group(false)?,
        "__timeGroupAlias" => format!("{} AS \"time\"", group(false)?),
        "__unixEpochFilter" => {
            let c = col()?;
            format!("{c} >= {from_s} AND {c} <= {to_s}")
        }
        "__unixEpochNanoFilter" => {
            let c = col()?;
            format!(
                "{c} >= {} AND {c} <= {}",
                i128::from(range.from_ms) * 1_000_000,
                i128::from(range.to_ms) * 1_000_000
            )
        }
        "__unixEpochNanoFrom" => (i128::from(range.from_ms) * 1_000_000).to_string(),
        "__unixEpochNanoTo" => (i128::from(range.to_ms) * 1_000_000).to_string(),
        "__unixEpochGroup" => group(true)?,
        "__unixEpochGroupAlias" => format!("{} AS \"time\"", group(true)?),
        _ => return Err(format!("unknown macro {name:?}")),
    })
}

/// The backend's steps: the SQL datasources' global substitutions, then every
/// `$name(args)` as a macro (the datasource's regex `\$([_a-zA-Z0-9]+)\(([^\)]*)\)`).
fn replace_macros(sql: &str, range: &Range, timescaledb: bool) -> Result<String, String> {
    let sql = sql
        .replace("$__interval_ms", &range.interval_ms.to_string())
        .replace("$__interval", &format_interval(range.interval_ms))
        .replace(
            "$__unixEpochFrom()",
            &range.from_ms.div_euclid(1000).to_string(),
        )
        .replace(
            "$__unixEpochTo()",
            &range.to_ms.div_euclid(1000).to_string(),
        );
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql.as_str();
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let after = &rest[1..];
        let name: String = after.chars().take_while(|&c| is_word(c)).collect();
        let call = after[name.len()..]
            .strip_prefix('(')
            .and_then(|a| a.find(')').map(|end| (&a[..end], name.len() + 1 + end + 1)));
        let Some((args, len)) = call.filter(|_| !name.is_empty()) else {
            // Not a macro call: left as is (and refused below).
            out.push('$');
            rest = after;
            continue;
        };
        let text = &rest[..len + 1];
        let mut name = name.clone();
        // Grafana before 5.3 wrote `$__timeGroup(..),` for the aliased form: the datasource
        // still reads it so when a comma follows the first occurrence of the same call.
        if name == "__timeGroup" {
            if let Some(i) = sql.find(text) {
                if sql[i + text.len()..].starts_with(',') {
                    name = "__timeGroupAlias".into();
                }
            }
        }
        let args: Vec<String> = args.split(',').map(|a| a.trim().to_owned()).collect();
        out.push_str(&macro_value(&name, &args, range, timescaledb)?);
        rest = &rest[len + 1..];
    }
    out.push_str(rest);
    // Whatever still looks like a variable or macro was not expanded: Grafana would send it
    // to PostgreSQL as it is.
    if let Some(at) = out.find('$').filter(|&at| {
        out[at + 1..]
            .chars()
            .next()
            .is_some_and(|c| is_word(c) || c == '{')
    }) {
        return Err(format!(
            "not expanded: {:?}",
            &out[at..out.len().min(at + 30)]
        ));
    }
    Ok(out)
}

/// A query as Grafana sends it to PostgreSQL.
fn expand(
    sql: &str,
    range: &Range,
    vars: &BTreeMap<String, Var>,
    timescaledb: bool,
) -> Result<String, String> {
    replace_macros(&replace_variables(sql, range, vars)?, range, timescaledb)
}

#[test]
fn macros_expand_as_grafana_expands_them() {
    // 2024-03-01T10:00:00Z to 2024-03-01T16:00:00.5Z, interval 30 s.
    let range = Range {
        from_ms: 1_709_287_200_000,
        to_ms: 1_709_308_800_500,
        interval_ms: 30_000,
    };
    let vars = BTreeMap::from([
        (
            "topic".to_owned(),
            Var {
                values: vec!["a/b's".into()],
                multi: false,
            },
        ),
        (
            "area".to_owned(),
            Var {
                values: vec!["x".into(), "y'z".into(), "q\"r".into()],
                multi: true,
            },
        ),
    ]);
    let e = |sql: &str, ts: bool| expand(sql, &range, &vars, ts).unwrap();
    assert_eq!(
        e("WHERE $__timeFilter(time)", false),
        "WHERE time BETWEEN '2024-03-01T10:00:00Z' AND '2024-03-01T16:00:00.5Z'"
    );
    assert_eq!(
        e("$__timeFrom() $__timeTo()", false),
        "'2024-03-01T10:00:00Z' '2024-03-01T16:00:00.5Z'"
    );
    assert_eq!(
        e(
            "$__unixEpochFilter(t) $__unixEpochFrom() $__unixEpochTo()",
            false
        ),
        "t >= 1709287200 AND t <= 1709308800 1709287200 1709308800"
    );
    assert_eq!(e("$__interval $__interval_ms", false), "30s 30000");
    assert_eq!(
        e("SELECT $__timeGroupAlias(time, $__interval), avg(v)", false),
        "SELECT floor(extract(epoch from time)/30)*30 AS \"time\", avg(v)"
    );
    assert_eq!(
        e("SELECT $__timeGroupAlias(time, $__interval), avg(v)", true),
        "SELECT time_bucket('30.000s',time) AS \"time\", avg(v)"
    );
    // The pre-5.3 form: a comma right after $__timeGroup(..) adds the alias.
    assert_eq!(
        e("SELECT $__timeGroup(time, '5m'), 1 GROUP BY $__timeGroup(time, '5m')", false),
        "SELECT floor(extract(epoch from time)/300)*300 AS \"time\", 1 GROUP BY floor(extract(epoch from time)/300)*300 AS \"time\""
    );
    assert_eq!(
        e("$__timeGroup(time, 2w, NULL)", false),
        "floor(extract(epoch from time)/1.2096e+06)*1.2096e+06"
    );
    assert_eq!(
        e("$__timeGroup(time, 500ms)", true),
        "time_bucket('0.500s',time)"
    );
    assert_eq!(
        e("$__time(t) $__timeEpoch(t)", false),
        "t AS \"time\" extract(epoch from t) as \"time\""
    );
    // Template variables in every form Grafana's SQL datasources take.
    assert_eq!(
        e("'$topic' '${topic}' '[[topic]]'", false),
        "'a/b''s' 'a/b''s' 'a/b''s'"
    );
    assert_eq!(e("${topic:sqlstring}", false), "'a/b''s'");
    assert_eq!(e("IN ($area)", false), "IN ('x','y''z','q\"r')");
    assert_eq!(
        e("IN (${area:sqlstring})", false),
        "IN ('x','y''z','q\\\"r')"
    );
    assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(go_float(86_400.0), "86400");
    assert_eq!(go_float(0.5), "0.5");
}

#[test]
fn an_unknown_macro_variable_or_format_fails() {
    let range = Range::last(HOUR, 1_709_287_200_000);
    let vars = BTreeMap::from([(
        "topic".to_owned(),
        Var {
            values: vec!["a".into()],
            multi: false,
        },
    )]);
    for sql in [
        "WHERE $__timeRange(time)",
        "WHERE $__timefilter(time)",
        "WHERE $__timeFilter()",
        "SELECT $__timeGroup(time)",
        "SELECT $__timeGroup(time, soon)",
        "WHERE topic = '$device'",
        "WHERE topic = ${topic:percentencode}",
        "WHERE x > $__range_s",
        "WHERE x > $__from",
        "WHERE t > $__timeFrom",
        "WHERE t > ${__to:date}",
    ] {
        assert!(
            expand(sql, &range, &vars, false).is_err(),
            "{sql} should not expand: {:?}",
            expand(sql, &range, &vars, false)
        );
    }
}

// ------------------------------------------------------------------------------------------
// Dashboards.

struct Dashboard {
    file: String,
    json: Json,
}

fn dashboards() -> Vec<Dashboard> {
    let dir = repo().join("deploy/grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "dashboards in {}", dir.display());
    files
        .into_iter()
        .map(|p| Dashboard {
            file: p.file_name().unwrap().to_string_lossy().into_owned(),
            json: serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        })
        .collect()
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        out.push(p);
        for inner in p["panels"].as_array().into_iter().flatten() {
            out.push(inner);
        }
    }
    out
}

/// The datasource uid of a target (its own, else its panel's).
fn target_uid<'a>(panel: &'a Json, target: &'a Json) -> Option<&'a str> {
    target["datasource"]["uid"]
        .as_str()
        .or(panel["datasource"]["uid"].as_str())
}

/// `now-6h` and the like, as a width in milliseconds.
fn relative_width(from: &str) -> i64 {
    let rest = from
        .strip_prefix("now-")
        .unwrap_or_else(|| panic!("time range {from:?}: only now-<n><unit> is checked"));
    let n: i64 = rest[..rest.len() - 1].parse().unwrap();
    n * match &rest[rest.len() - 1..] {
        "m" => MINUTE,
        "h" => HOUR,
        "d" => DAY,
        "w" => 7 * DAY,
        u => panic!("time unit {u}"),
    }
}

fn provisioned_timescaledb() -> bool {
    let text =
        std::fs::read_to_string(repo().join("deploy/grafana/provisioning/datasources/nexus.yaml"))
            .unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let sources = docs[0]["datasources"].as_vec().unwrap();
    let uids: Vec<&str> = sources.iter().filter_map(|d| d["uid"].as_str()).collect();
    assert_eq!(uids, [HISTORIAN_UID, PROMETHEUS_UID]);
    let pg = &sources[0];
    assert_eq!(pg["type"].as_str(), Some("grafana-postgresql-datasource"));
    pg["jsonData"]["timescaledb"].as_bool().unwrap_or(false)
}

#[test]
fn every_panel_names_a_provisioned_datasource_and_prometheus_metrics_exist() {
    // Metric names the services register: quoted in their sources.
    let mut sources = String::new();
    for krate in [
        "common",
        "protocol-gateway",
        "command-handler",
        "data-ingestion",
        "alert-service",
        "orchestrator",
        "devices",
    ] {
        let mut stack = vec![repo().join(krate).join("src")];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "rs") {
                    sources.push_str(&std::fs::read_to_string(&p).unwrap());
                }
            }
        }
    }
    let mut checked = 0;
    for d in dashboards() {
        for p in panels(&d.json) {
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            assert!(
                !targets.is_empty(),
                "{}: panel {:?} has no query",
                d.file,
                p["title"]
            );
            for t in targets {
                match target_uid(p, t) {
                    Some(HISTORIAN_UID) => assert!(
                        t["rawSql"].as_str().is_some_and(|s| !s.is_empty()),
                        "{}: {:?}",
                        d.file,
                        p["title"]
                    ),
                    Some(PROMETHEUS_UID) => {
                        let expr = t["expr"].as_str().unwrap();
                        let mut rest = expr;
                        while let Some(at) = rest.find(|c: char| c.is_ascii_lowercase()) {
                            rest = &rest[at..];
                            let word: String = rest.chars().take_while(|&c| is_word(c)).collect();
                            rest = &rest[word.len()..];
                            if !(word.starts_with("nexus_") || word.starts_with("process_")) {
                                continue;
                            }
                            let name = word.strip_suffix("_bucket").unwrap_or(&word);
                            assert!(
                                sources.contains(&format!("\"{name}\"")),
                                "{}: panel {:?} uses {word}, which no service registers",
                                d.file,
                                p["title"]
                            );
                            checked += 1;
                        }
                    }
                    other => panic!(
                        "{}: panel {:?} uses datasource {other:?}, not a provisioned one",
                        d.file, p["title"]
                    ),
                }
            }
        }
    }
    assert!(checked > 20, "{checked} metric names checked");
}

// ------------------------------------------------------------------------------------------
// The historian, made by the services.

/// Dense tags: a value every 10 s for 3 days.
const DENSE_TAGS: usize = 16;
/// The rest of a small plant: a value every 5 minutes. With them a tag holds the share of
/// the rows it holds in a plant, which is what the planner weighs an index against.
const SPARSE_TAGS: usize = 400;

fn topic(i: usize) -> String {
    format!(
        "acme/plant-1/area-{}/line-{}/plc-{}/temperature",
        i % 2 + 1,
        i % 4 + 1,
        i
    )
}

async fn sql(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

async fn count(db: &tokio_postgres::Client, q: &str) -> i64 {
    db.query_one(q, &[]).await.map(|r| r.get(0)).unwrap_or(-1)
}

async fn wait_count(db: &tokio_postgres::Client, q: &str, want: i64) {
    let start = Instant::now();
    loop {
        let n = count(db, q).await;
        if n >= want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{q}: {n} of {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Ingestion makes the historian schema and stores the last 20 minutes published through the
/// embedded broker (and two messages it rejects); SQL adds the 3 days before, in the same
/// layout; the alarm journal's and the command audit's writers make their tables and rows.
async fn historian(pg: &PgServer, timescaledb: bool) -> (String, String) {
    let owner = pg.create_database("historian").await;
    sql(&owner)
        .await
        .batch_execute(DEFAULT_PRIVILEGES)
        .await
        .unwrap();
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let http = free_port();
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: grafana-test }}\n\
         database:\n  url: \"{owner}\"\n\
         ingestion:\n  http_listen: 127.0.0.1:{http}\n  wal_dir: {}\n  batch_timeout: 20ms\n",
        wal.path().display()
    );
    let cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let token = CancellationToken::new();
    let ingest = tokio::spawn(nexus_data_ingestion::run(Arc::new(cfg), token.clone()));
    let start = Instant::now();
    loop {
        let (status, _) = testing::http(http, "GET", "/readyz", "");
        if status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "ingestion not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut c = testing::service_mqtt_config(port);
    c.inflight = 1000;
    let (publisher, _rx) = mqtt::connect(
        &c,
        ClientSettings::new(testing::unique("pub")),
        None,
        CancellationToken::new(),
    )
    .unwrap();
    publisher
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let now = now_ms();
    let recent_start = now - now % 10_000 - 20 * MINUTE;
    let mut published = 0;
    for i in 0..DENSE_TAGS {
        let mut t = recent_start;
        while t <= now {
            let v = 50.0 + (i as f64) + ((t / 10_000) % 60) as f64 * 0.25;
            publisher
                .publish(
                    &topic(i),
                    format!(r#"{{"v":{v},"q":"good","ts":{t},"u":"degC"}}"#),
                    QoS::AtLeastOnce,
                    false,
                )
                .await
                .unwrap();
            published += 1;
            t += 10_000;
        }
    }
    // A string and a bool tag, and two messages ingestion rejects (ingest_rejects).
    for (k, body) in [
        ("state", format!(r#"{{"v":"running","ts":{now}}}"#)),
        ("running", format!(r#"{{"v":true,"ts":{now}}}"#)),
    ] {
        publisher
            .publish(
                &format!("acme/plant-1/area-1/line-1/plc-0/{k}"),
                body,
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
        published += 1;
    }
    for body in ["not json", r#"{"q":"good"}"#] {
        publisher
            .publish(
                "acme/plant-1/area-2/line-2/plc-1/pressure",
                body.to_owned(),
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
    }
    let db = sql(&owner).await;
    wait_count(&db, "SELECT count(*) FROM points", published).await;
    wait_count(&db, "SELECT count(*) FROM ingest_rejects", 2).await;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), ingest)
        .await
        .expect("ingestion stops")
        .unwrap()
        .unwrap();

    // The 3 days before, a value every 10 s per tag, in time order as ingestion writes.
    let topics: Vec<String> = (0..DENSE_TAGS).map(topic).collect();
    db.execute(
        "INSERT INTO points (time, tag_id, value, quality, value_type, unit)
         SELECT g, t.id, 50 + t.id + 20 * sin(extract(epoch FROM g) / 3600.0 + t.id), 192, 3, 'degC'
         FROM tags t,
              generate_series(to_timestamp($1::float8 / 1000) - INTERVAL '3 days',
                              to_timestamp($1::float8 / 1000) - INTERVAL '10 seconds',
                              INTERVAL '10 seconds') g
         WHERE t.topic = ANY($2)
         ORDER BY g, t.id",
        &[&(recent_start as f64), &topics],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO tags (topic)
         SELECT format('acme/plant-1/area-%s/line-%s/plc-%s/ai-%s', g % 2 + 1, g % 4 + 1, g % 50, g)
         FROM generate_series(1, $1::int) g",
        &[&(SPARSE_TAGS as i32)],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO points (time, tag_id, value, quality, value_type)
         SELECT g, t.id, t.id % 100 + extract(minute FROM g), 192, 3
         FROM tags t,
              generate_series(to_timestamp($1::float8 / 1000) - INTERVAL '3 days',
                              to_timestamp($1::float8 / 1000), INTERVAL '5 minutes') g
         WHERE t.topic LIKE '%/ai-%'
         ORDER BY g, t.id",
        &[&(now as f64)],
    )
    .await
    .unwrap();

    // The alarm journal and the command audit, through the services' writers (which create
    // their tables as the services do).
    let writers = CancellationToken::new();
    let journal = nexus_alert_service::journal::start(Database::at(&owner), writers.clone());
    let audit = nexus_command_handler::audit::start_writer(Database::at(&owner), writers.clone());
    let mut alarms = 0;
    let mut commands = 0;
    for k in 0..36i64 {
        // Every 2 hours over 3 days: an alarm raised, acknowledged and cleared.
        let t0 = now - 3 * DAY + k * 2 * HOUR + 5 * MINUTE;
        let i = (k % 6) as usize;
        let rule = if k % 3 == 0 { "hot" } else { "very-hot" };
        let area = format!("acme/plant-1/area-{}", i % 2 + 1);
        for (dt, event, state, user) in [
            (0, Event::Activated, State::ActiveUnacked, None),
            (
                3 * MINUTE,
                Event::Acknowledged,
                State::ActiveAcked,
                Some("operator"),
            ),
            (20 * MINUTE, Event::Cleared, State::Normal, None),
        ] {
            let ts = t0 + dt;
            journal
                .send(JournalRow {
                    change: Change {
                        rule_id: rule.into(),
                        topic: topic(i),
                        event,
                        alarm: Alarm {
                            state,
                            since_ms: ts,
                            ..Alarm::default()
                        },
                        severity: if rule == "hot" { 700 } else { 900 },
                        value: Some(Value::Float(85.5)),
                        message: format!("{} is 85.5 above 80", topic(i)),
                        area: area.clone(),
                        ts_ms: ts,
                        user: user.map(str::to_owned),
                        comment: user.map(|_| "checked on site".to_owned()),
                    },
                })
                .await
                .unwrap();
            alarms += 1;
        }
        // And a setpoint written, one in four refused by the device.
        let ok = k % 4 != 0;
        audit
            .send(AuditRecord {
                ts_ms: t0 + MINUTE,
                device: format!("plc-{}", k % 3),
                tag: "setpoint".into(),
                request_id: Some(format!("r-{k}")),
                user: Some("operator".into()),
                claimed_user: None,
                value: Some(Value::Float(72.5)),
                old_value: Some(Value::Float(70.0)),
                read_back: ok.then_some(Value::Float(72.5)),
                success: ok,
                error: (!ok).then(|| "device exception: illegal data value".into()),
                duration_ms: 2.5 + k as f64,
            })
            .await
            .unwrap();
        commands += 1;
    }
    // One alarm standing now, not acknowledged.
    journal
        .send(JournalRow {
            change: Change {
                rule_id: "pressure-low".into(),
                topic: topic(3),
                event: Event::Activated,
                alarm: Alarm {
                    state: State::ActiveUnacked,
                    since_ms: now - 10 * MINUTE,
                    ..Alarm::default()
                },
                severity: 500,
                value: Some(Value::Float(1.2)),
                message: "pressure below 1.5".into(),
                area: "acme/plant-1/area-2".into(),
                ts_ms: now - 10 * MINUTE,
                user: None,
                comment: None,
            },
        })
        .await
        .unwrap();
    alarms += 1;
    wait_count(&db, "SELECT count(*) FROM alarm_events", alarms).await;
    wait_count(&db, "SELECT count(*) FROM command_audit", commands).await;
    writers.cancel();

    if timescaledb {
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM timescaledb_information.continuous_aggregates"
            )
            .await,
            3,
            "TimescaleDB's continuous aggregates"
        );
        // What the refresh policies do (their background jobs do not run on every server:
        // docs/ingestion.md, TimescaleDB health).
        for agg in ["points_1min", "points_1hour", "points_1day"] {
            db.batch_execute(&format!(
                "CALL refresh_continuous_aggregate('{agg}', NULL, NULL)"
            ))
            .await
            .unwrap();
        }
    }
    db.batch_execute("ANALYZE").await.unwrap();
    db.batch_execute(GRANTS).await.unwrap();
    drop(broker);
    (
        owner.replace("postgres://nexus@", &format!("postgres://{READER}@")),
        owner.replace(
            "postgres://nexus@",
            &format!("postgres://{DEFAULT_READER}@"),
        ),
    )
}

/// The template variables of a dashboard with the values a user would see first: a query
/// variable's first answer (all of them for a multi-value one, as its All), a custom
/// variable's current value.
async fn variables(
    d: &Dashboard,
    db: &tokio_postgres::Client,
    range: &Range,
    timescaledb: bool,
    ran: &mut usize,
) -> BTreeMap<String, Var> {
    let mut vars = BTreeMap::new();
    for v in d.json["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().unwrap().to_owned();
        let multi =
            v["multi"].as_bool().unwrap_or(false) || v["includeAll"].as_bool().unwrap_or(false);
        let values = match v["type"].as_str() {
            Some("query") if v["datasource"]["uid"] == HISTORIAN_UID => {
                let q = v["query"].as_str().unwrap();
                let sql = expand(q, range, &vars, timescaledb)
                    .unwrap_or_else(|e| panic!("{}: variable {name}: {e}", d.file));
                let rows = db
                    .query(&sql, &[])
                    .await
                    .unwrap_or_else(|e| panic!("{}: variable {name}: {e}\n{sql}", d.file));
                assert!(
                    !rows.is_empty(),
                    "{}: variable {name} has no values:\n{sql}",
                    d.file
                );
                *ran += 1;
                let all: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
                if multi {
                    all
                } else {
                    all[..1].to_vec()
                }
            }
            Some("query") => continue, // Prometheus: not for SQL panels.
            Some("custom") => vec![v["current"]["value"].as_str().unwrap().to_owned()],
            other => panic!(
                "{}: variable {name} of type {other:?} is not checked",
                d.file
            ),
        };
        vars.insert(name, Var { values, multi });
    }
    vars
}

/// `EXPLAIN` of `sql`, one line per row.
async fn explain(db: &tokio_postgres::Client, sql: &str) -> String {
    db.query(&format!("EXPLAIN {sql}"), &[])
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN: {e}\n{sql}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every variable and SQL panel of every dashboard, at the dashboard's own range, as the
/// role of `db`: each must answer with rows. Returns how many ran.
async fn run_every_query(
    db: &tokio_postgres::Client,
    grafana_timescaledb: bool,
    now: i64,
) -> usize {
    let mut ran = 0;
    for d in dashboards() {
        let width = relative_width(d.json["time"]["from"].as_str().unwrap());
        assert_eq!(d.json["time"]["to"], "now", "{}", d.file);
        let range = Range::last(width, now);
        let vars = variables(&d, db, &range, grafana_timescaledb, &mut ran).await;
        for p in panels(&d.json) {
            for t in p["targets"].as_array().into_iter().flatten() {
                if target_uid(p, t) != Some(HISTORIAN_UID) {
                    continue;
                }
                let what = format!("{}: panel {:?} {}", d.file, p["title"], t["refId"]);
                let sql = expand(
                    t["rawSql"].as_str().unwrap(),
                    &range,
                    &vars,
                    grafana_timescaledb,
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                let rows = db
                    .query(&sql, &[])
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}\n{sql}"));
                assert!(!rows.is_empty(), "{what}: no rows\n{sql}");
                match t["format"].as_str() {
                    Some("time_series") => assert!(
                        rows[0].columns().iter().any(|c| c.name() == "time"),
                        "{what}: a time series needs a time column"
                    ),
                    Some("table") => {}
                    other => panic!("{what}: format {other:?}"),
                }
                ran += 1;
            }
        }
    }
    assert!(ran >= 30, "{ran} queries run");
    ran
}

async fn every_query_answers(pg: PgServer, timescaledb: bool) {
    let (reader_url, default_reader_url) = historian(&pg, timescaledb).await;
    let grafana_timescaledb = provisioned_timescaledb();
    let now = now_ms();
    // The role of docs/grafana.md, with its grants, and the one deploy/compose makes (default
    // privileges given before Nexus made its tables): they read, and may not write.
    for url in [&default_reader_url, &reader_url] {
        let db = sql(url).await;
        assert!(
            db.batch_execute("DELETE FROM alarm_events").await.is_err(),
            "the Grafana role may not write"
        );
        let ran = run_every_query(&db, grafana_timescaledb, now).await;
        println!(
            "{ran} dashboard queries answered as {}",
            url.split('@').next().unwrap()
        );
    }
    let db = sql(&reader_url).await;

    // The tag explorer: the tier by range, and an index on the raw points.
    let d = dashboards()
        .into_iter()
        .find(|d| d.json["uid"] == "nexus-tag-explorer")
        .unwrap();
    let explorer = panels(&d.json)
        .into_iter()
        .find(|p| p["type"] == "timeseries")
        .unwrap()["targets"][0]["rawSql"]
        .as_str()
        .unwrap()
        .to_owned();
    let vars = BTreeMap::from([(
        "topic".to_owned(),
        Var {
            values: vec![topic(5)],
            multi: false,
        },
    )]);
    let points_scan = if timescaledb {
        let id: i32 = db
            .query_one(
                "SELECT id FROM _timescaledb_catalog.hypertable WHERE table_name = 'points'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        format!("Seq Scan on _hyper_{id}_")
    } else {
        "Seq Scan on points".to_owned()
    };
    for (width, tier, at_least) in [
        (HOUR, "raw", 300),
        (2 * DAY, "1 min avg", 2_000),
        (30 * DAY, "1 hour avg", 70),
        (1000 * DAY, "1 day avg", 3),
    ] {
        let range = Range::last(width, now);
        let sql = expand(&explorer, &range, &vars, grafana_timescaledb).unwrap();
        let rows = db.query(&sql, &[]).await.unwrap();
        let tiers: Vec<String> = rows.iter().map(|r| r.get("metric")).collect();
        assert!(
            rows.len() >= at_least && tiers.iter().all(|t| t == tier),
            "a range of {} h is answered from {tier} ({} rows, tiers {:?})",
            width / HOUR,
            rows.len(),
            tiers.first()
        );
        let plan = explain(&db, &sql).await;
        // Never a sequential scan of the raw points: on TimescaleDB the real-time
        // aggregates' tail (buckets past the watermark, every tag, filtered on time) reads
        // the newest chunk through its BRIN index on time.
        assert!(
            !plan.contains(&points_scan),
            "range {} h: a sequential scan of the raw points:\n{plan}",
            width / HOUR
        );
        assert!(
            plan.contains("Index"),
            "range {} h: no index:\n{plan}",
            width / HOUR
        );
        let raw_line = plan
            .lines()
            .find(|l| l.contains("points_tag_time"))
            .unwrap_or_else(|| {
                panic!(
                    "range {} h: the (tag_id, time) index:\n{plan}",
                    width / HOUR
                )
            });
        println!(
            "{}: range {} h -> {tier}, {} rows; {}",
            if timescaledb {
                "TimescaleDB"
            } else {
                "PostgreSQL"
            },
            width / HOUR,
            rows.len(),
            raw_line.trim()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_answers_on_postgresql() {
    every_query_answers(PgServer::start(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_answers_on_timescaledb() {
    let Some(pg) = PgServer::start_with_timescaledb() else {
        eprintln!("skipped: TimescaleDB is not installed for the test PostgreSQL");
        return;
    };
    every_query_answers(pg, true).await;
}
