//! The operator commands besides `run`, one file each:
//! * [`inspect`]: the pinned XDP maps as tables or JSON, with the agent running or not;
//! * [`status`]: what the running agent reports (dataplane, last sync, errors);
//! * [`preflight`]: can XDP or IPVS run on this node, and what to fix;
//! * [`cleanup`]: remove everything xlb created, for a clean rollback.
//!
//! Each command returns its process exit code; errors that stop a command are returned as
//! errors (exit code 1 from `main`).

pub mod cleanup;
pub mod inspect;
pub mod preflight;
pub mod status;

/// A table for people: columns padded to their widest cell, two spaces apart, no trailing
/// blanks.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_aligned() {
        let t = render_table(
            &["A", "LONG HEADER", "C"],
            &[
                vec!["xxxx".into(), "y".into(), "z".into()],
                vec!["".into(), "".into(), "".into()],
            ],
        );
        assert_eq!(t, "A     LONG HEADER  C\nxxxx  y            z\n\n");
    }
}
