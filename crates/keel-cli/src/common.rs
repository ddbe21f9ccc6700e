//! What every client command shares: finding the cluster, turning client errors into one clear
//! line, and parsing flag values (KEY=VALUE pairs, timestamps).

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Result, anyhow};
use clap::Args;
use keel_client::{Admin, Client, ClientConfig, ClientError};

/// The default bootstrap broker when neither `--brokers` nor `KEEL_BROKERS` says otherwise.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9292";

/// `--brokers`, shared by every command that talks to a cluster.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Brokers to bootstrap from, comma-separated; any broker of the cluster will do, the rest
    /// are found through it [env: KEEL_BROKERS] [default: 127.0.0.1:9292].
    #[arg(
        long,
        global = true,
        value_name = "HOST:PORT[,HOST:PORT...]",
        value_parser = parse_brokers,
    )]
    pub brokers: Option<Brokers>,
}

/// `keel --brokers X <command>`: the same option given before the command.
static TOP_LEVEL_BROKERS: OnceLock<Brokers> = OnceLock::new();

pub fn set_top_level_brokers(b: Brokers) {
    let _ = TOP_LEVEL_BROKERS.set(b);
}

impl ClientOpts {
    /// `--brokers` after the command, else before it, else `KEEL_BROKERS`, else the default.
    pub fn resolve(&self) -> Result<Brokers> {
        if let Some(b) = self.brokers.as_ref().or(TOP_LEVEL_BROKERS.get()) {
            return Ok(b.clone());
        }
        match std::env::var("KEEL_BROKERS") {
            Ok(v) => parse_brokers(&v).map_err(|e| usage(format!("invalid KEEL_BROKERS: {e}"))),
            Err(std::env::VarError::NotPresent) => parse_brokers(DEFAULT_BROKERS).map_err(usage),
            Err(e) => Err(usage(format!("invalid KEEL_BROKERS: {e}"))),
        }
    }
}

/// A validated, non-empty list of `HOST:PORT` addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers(pub Vec<String>);

impl std::fmt::Display for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// Parses `HOST:PORT[,HOST:PORT…]`. An empty value (say `KEEL_BROKERS=`) means the default.
pub fn parse_brokers(s: &str) -> Result<Brokers, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addr = part.strip_prefix("http://").unwrap_or(part);
        let addr = addr.strip_suffix('/').unwrap_or(addr);
        let ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
        });
        if !ok {
            return Err(format!("{part:?} is not HOST:PORT"));
        }
        if !out.iter().any(|a| a == addr) {
            out.push(addr.to_owned());
        }
    }
    if out.is_empty() {
        out.push(DEFAULT_BROKERS.to_owned());
    }
    Ok(Brokers(out))
}

/// An error the user should fix on the command line: reported like clap's own (exit 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// How long finding the cluster may take before the command gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects and fetches the cluster metadata once, so an unreachable cluster fails here with
/// the addresses tried: at once when connections are refused, within [`CONNECT_TIMEOUT`] when
/// a host stays silent.
pub async fn connect(opts: &ClientOpts) -> Result<Client> {
    let brokers = opts.resolve()?;
    let config = ClientConfig::default()
        .connect_timeout(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(30));
    let connecting = Client::connect_with(&brokers.0, config);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(ClientError::InvalidInput(m))) => Err(usage(m)),
        // Anything but a Keel broker's own answer: refused, silent, or not a Keel broker.
        Ok(Err(e)) if e.reason().is_none() => Err(anyhow!(
            "cannot reach the cluster at {brokers}: {}",
            explain_msg(&e, None)
        )),
        Ok(Err(e)) => Err(explain(e, None)),
        Err(_) => Err(anyhow!(
            "cannot reach the cluster at {brokers}: no broker answered within {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// Connects (see [`connect`]) and makes the admin requests of one command, explaining a failure
/// as [`explain`] does (`topic` names the topic they are about).
pub async fn admin_request<T>(
    opts: &ClientOpts,
    topic: Option<&str>,
    request: impl AsyncFnOnce(&Admin) -> std::result::Result<T, ClientError>,
) -> Result<T> {
    let admin = connect(opts).await?.admin();
    request(&admin).await.map_err(|e| explain(e, topic))
}

/// One clear message for a client error; `topic` names the topic the command was about, for
/// `topic "x" not found`.
pub fn explain(e: ClientError, topic: Option<&str>) -> anyhow::Error {
    anyhow!(explain_msg(&e, topic))
}

pub fn explain_msg(e: &ClientError, topic: Option<&str>) -> String {
    match e {
        ClientError::UnknownTopic { message, .. } => match topic {
            Some(t) => format!("topic {t:?} not found"),
            None => message.clone(),
        },
        // The broker's messages already say what was invalid ("invalid config retention.ms:
        // …", "invalid partitions: …"); the variant's prefix would repeat it.
        ClientError::InvalidConfig { message, .. }
        | ClientError::InvalidArgument { message, .. } => message.clone(),
        ClientError::InvalidInput(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Parses `KEY=VALUE` (the value may be empty, the key may not).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Parses a timestamp: milliseconds since the epoch, or RFC 3339
/// (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00.250+02:00`).
pub fn parse_timestamp(s: &str) -> Result<i64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<i64>()
            .map_err(|_| format!("{s:?} is too large for milliseconds since the epoch"));
    }
    match parse_rfc3339(t) {
        Some(ms) if ms >= 0 => Ok(ms),
        Some(_) => Err(format!("{s:?} is before 1970-01-01T00:00:00Z")),
        None => Err(format!(
            "{s:?} is neither milliseconds since the epoch nor an RFC 3339 timestamp such as \
             2024-05-01T12:00:00Z"
        )),
    }
}

/// `YYYY-MM-DD(T|t| )HH:MM:SS[.FRACTION](Z|z|±HH:MM)` to milliseconds since the epoch
/// (fractions below a millisecond are truncated; a leap second counts as the next second).
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    let year = num(0, 4)?;
    let month = num(5, 2)?;
    let day = num(8, 2)?;
    let hour = num(11, 2)?;
    let minute = num(14, 2)?;
    let second = num(17, 2)?;
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i];
        let mut ms = String::from(&digits[..digits.len().min(3)]);
        while ms.len() < 3 {
            ms.push('0');
        }
        millis = ms.parse::<i64>().ok()?;
    }
    let offset_minutes = match &s[i..] {
        "Z" | "z" => 0,
        rest if rest.len() == 6 && sep(i + 3, b":") => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 60 + m)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
    Some(secs * 1_000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers() {
        assert_eq!(
            parse_brokers(" a:1, b:2 ,a:1"),
            Ok(Brokers(vec!["a:1".into(), "b:2".into()]))
        );
        assert_eq!(
            parse_brokers("http://h:9292/"),
            Ok(Brokers(vec!["h:9292".into()]))
        );
        assert_eq!(parse_brokers(""), Ok(Brokers(vec![DEFAULT_BROKERS.into()])));
        assert_eq!(
            parse_brokers("[::1]:9292"),
            Ok(Brokers(vec!["[::1]:9292".into()]))
        );
        for bad in ["localhost", "h:99999", ":1", "h:x", "a b:1"] {
            assert!(parse_brokers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_values() {
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_key_value("a="), Ok(("a".into(), String::new())));
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_timestamp("0"), Ok(0));
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_timestamp("2023-11-14T22:13:20Z"),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_timestamp("2023-11-14T22:13:20.5Z"),
            Ok(1_700_000_000_500)
        );
        assert_eq!(
            parse_timestamp("2023-11-14t22:13:20.123456z"),
            Ok(1_700_000_000_123)
        );
        assert_eq!(
            parse_timestamp("2023-11-15T00:13:20+02:00"),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_timestamp("2023-11-14 17:13:20-05:00"),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_timestamp("2024-02-29T00:00:00Z"),
            Ok(1_709_164_800_000)
        );
        for bad in [
            "",
            "-5",
            "yesterday",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-02-29T00:00:00Z",
            "2023-13-01T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20+0200",
            "1969-12-31T23:59:59Z",
            "99999999999999999999",
        ] {
            assert!(parse_timestamp(bad).is_err(), "{bad}");
        }
    }
}

/// Options of every listing command: output format and where the cluster is.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub output: crate::output::OutputOpts,
    #[command(flatten)]
    pub client: ClientOpts,
}
