//! The reasons table of `docs/api.md` (section 2.2) is what client writers in other languages
//! code against: it must list exactly the reasons the broker and the Rust client share, in the
//! same order, each with its gRPC code.

use keel_types::ErrorReason;

const API_MD: &str = include_str!("../../../docs/api.md");

/// The table's rows as (reason, gRPC code number), in document order.
fn documented() -> Vec<(String, i32)> {
    let section = API_MD
        .split_once("### 2.2 Reasons")
        .map(|(_, rest)| rest)
        .expect("docs/api.md has a section 2.2 Reasons");
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let reason = cells[1].trim_matches('`').to_owned();
            let code = cells[2]
                .rsplit_once('(')
                .and_then(|(_, n)| n.trim_end_matches(')').parse().ok())
                .unwrap_or_else(|| panic!("no gRPC code number in the row of {reason}"));
            (reason, code)
        })
        .collect()
}

#[test]
fn the_documented_reasons_are_the_shared_ones_with_their_codes() {
    let shared: Vec<(String, i32)> = ErrorReason::ALL
        .iter()
        .map(|r| (r.as_str().to_owned(), r.grpc_code()))
        .collect();
    assert_eq!(documented(), shared);
}
