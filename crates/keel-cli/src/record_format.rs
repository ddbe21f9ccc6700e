//! `keel consume --format`: placeholders and escapes, parsed once, rendered per record.

use keel_client::ConsumerRecord;

pub const FORMAT_HELP: &str = "How to print each record (a newline is added after each). \
Placeholders: %t topic, %p partition, %o offset, %k key, %v value, %T timestamp (ms since the \
epoch), %h headers (k1=v1,k2=v2; a header with a null value prints as its key alone), %% a \
literal %. Escapes: \\t tab, \\n newline, \\r carriage return, \\\\ backslash. A null key or \
value prints as nothing; keys and values are written as raw bytes";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(Vec<u8>),
    Topic,
    Partition,
    Offset,
    Key,
    Value,
    Timestamp,
    Headers,
}

/// A parsed `--format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFormat(Vec<Piece>);

impl Default for RecordFormat {
    fn default() -> Self {
        Self(vec![Piece::Value])
    }
}

/// Parses FMT; unknown placeholders and escapes are errors (clap reports them as usage errors).
pub fn parse_format(s: &str) -> Result<RecordFormat, String> {
    let mut pieces = Vec::new();
    let mut lit = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        let piece = match c {
            '%' => match chars.next() {
                Some('t') => Piece::Topic,
                Some('p') => Piece::Partition,
                Some('o') => Piece::Offset,
                Some('k') => Piece::Key,
                Some('v') => Piece::Value,
                Some('T') => Piece::Timestamp,
                Some('h') => Piece::Headers,
                Some('%') => {
                    lit.push(b'%');
                    continue;
                }
                Some(other) => {
                    return Err(format!(
                        "unknown placeholder %{other} (use %t %p %o %k %v %T %h, or %% for %)"
                    ));
                }
                None => return Err("the format ends with a lone % (use %% for %)".into()),
            },
            '\\' => {
                let b = match chars.next() {
                    Some('t') => b'\t',
                    Some('n') => b'\n',
                    Some('r') => b'\r',
                    Some('\\') => b'\\',
                    Some(other) => {
                        return Err(format!(
                            "unknown escape \\{other} (use \\t \\n \\r or \\\\)"
                        ));
                    }
                    None => return Err("the format ends with a lone \\ (use \\\\)".into()),
                };
                lit.push(b);
                continue;
            }
            other => {
                let mut buf = [0u8; 4];
                lit.extend_from_slice(other.encode_utf8(&mut buf).as_bytes());
                continue;
            }
        };
        if !lit.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(&mut lit)));
        }
        pieces.push(piece);
    }
    if !lit.is_empty() {
        pieces.push(Piece::Literal(lit));
    }
    Ok(RecordFormat(pieces))
}

impl RecordFormat {
    /// Appends the record's line, newline included.
    pub fn render(&self, r: &ConsumerRecord, out: &mut Vec<u8>) {
        use std::io::Write;
        for p in &self.0 {
            // Writing to a Vec cannot fail.
            let _ = match p {
                Piece::Literal(b) => out.write_all(b),
                Piece::Topic => out.write_all(r.topic.as_bytes()),
                Piece::Partition => write!(out, "{}", r.partition),
                Piece::Offset => write!(out, "{}", r.offset),
                Piece::Key => out.write_all(r.key.as_deref().unwrap_or_default()),
                Piece::Value => out.write_all(r.value.as_deref().unwrap_or_default()),
                Piece::Timestamp => write!(out, "{}", r.timestamp_ms),
                Piece::Headers => {
                    for (i, (k, v)) in r.headers.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(k.as_bytes());
                        if let Some(v) = v {
                            out.push(b'=');
                            out.extend_from_slice(v);
                        }
                    }
                    Ok(())
                }
            };
        }
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn record() -> ConsumerRecord {
        ConsumerRecord {
            topic: Arc::from("orders"),
            partition: 2,
            offset: 41,
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"k1")),
            value: Some(Bytes::from_static(b"hello")),
            headers: vec![
                ("a".into(), Some(Bytes::from_static(b"1"))),
                ("b".into(), None),
                ("c".into(), Some(Bytes::new())),
            ],
        }
    }

    fn render(fmt: &str, r: &ConsumerRecord) -> String {
        let mut out = Vec::new();
        parse_format(fmt).expect("format").render(r, &mut out);
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn placeholders_and_escapes() {
        let r = record();
        assert_eq!(render("%v", &r), "hello\n");
        assert_eq!(
            render("%t/%p@%o %T %k=%v [%h]", &r),
            "orders/2@41 1700000000000 k1=hello [a=1,b,c=]\n"
        );
        assert_eq!(
            render("%k\\t%v\\n--\\\\ 100%% é", &r),
            "k1\thello\n--\\ 100% é\n"
        );
        let mut bare = record();
        bare.key = None;
        bare.value = None;
        bare.headers.clear();
        assert_eq!(render("<%k|%v|%h>", &bare), "<||>\n");
        assert_eq!(RecordFormat::default(), parse_format("%v").expect("fmt"));
    }

    #[test]
    fn bad_formats() {
        for bad in ["%x", "abc%", "\\q", "x\\"] {
            assert!(parse_format(bad).is_err(), "{bad}");
        }
    }
}
