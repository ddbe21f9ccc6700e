//! `--output json|table` and the human tables.

use std::io::Write;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// One JSON document with stable field names, for scripts.
    Json,
}

/// `--output`, on every listing and describing command.
#[derive(Debug, Clone, Args)]
pub struct OutputOpts {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

impl OutputOpts {
    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }

    /// Prints a command's answer in the chosen format: `json` as one line of JSON, or the text
    /// `table` renders (built only when it is printed).
    pub fn print(&self, json: &impl Serialize, table: impl FnOnce() -> String) -> Result<()> {
        if self.json() {
            print_json(json)
        } else {
            print_text(&table())
        }
    }
}

/// Prints `value` as one line of JSON.
pub fn print_json(value: &impl Serialize) -> Result<()> {
    let s = serde_json::to_string(value).context("encoding JSON")?;
    print_text(&format!("{s}\n"))
}

/// Writes to stdout, reporting a closed pipe as an error instead of panicking as `print!` does.
pub fn print_text(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            if i + 1 < widths.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `table` with a row per item, `row` giving an item's cells.
pub fn table_of<T>(
    headers: &[&str],
    items: impl IntoIterator<Item = T>,
    row: impl FnMut(T) -> Vec<String>,
) -> String {
    let rows: Vec<Vec<String>> = items.into_iter().map(row).collect();
    table(headers, &rows)
}

/// `1,2,3`, or `-` for none.
pub fn id_list(ids: &[u32]) -> String {
    if ids.is_empty() {
        return "-".to_owned();
    }
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["NAME", "PARTITIONS"],
            &[
                vec!["orders".into(), "3".into()],
                vec!["a".into(), "12".into()],
            ],
        );
        assert_eq!(t, "NAME    PARTITIONS\norders  3\na       12\n");
        assert_eq!(table(&["A", "B"], &[]), "A  B\n");
        assert_eq!(id_list(&[1, 2, 3]), "1,2,3");
        assert_eq!(id_list(&[]), "-");
    }
}
