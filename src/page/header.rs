//! The facts sqlferry needs from the 100-byte SQLite file header, read with plain file
//! I/O before any SQLite connection is opened, so a file that is not a database is
//! refused without being touched.

use std::path::Path;

use crate::{Error, Result};

const MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// How a database keeps its journal, as its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalMode {
    /// Rollback journal (`-journal` file): file format versions 1.
    Rollback,
    /// Write-ahead log (`-wal` file): file format versions 2.
    Wal,
}

/// The header facts of a database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Page size in bytes.
    pub page_size: u32,
    /// Journal mode recorded in the file.
    pub journal_mode: JournalMode,
}

impl Header {
    /// Parses a header from the first 100 bytes of a database.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Header, String> {
        if bytes.len() < 100 || &bytes[..16] != MAGIC {
            return Err("not an SQLite database (bad header)".into());
        }
        let raw = u16::from_be_bytes([bytes[16], bytes[17]]);
        let page_size = if raw == 1 { 65536 } else { u32::from(raw) };
        if crate::protocol::check_page_size(page_size).is_err() {
            return Err(format!("header gives an invalid page size ({raw})"));
        }
        let journal_mode = match (bytes[18], bytes[19]) {
            (1, 1) => JournalMode::Rollback,
            (2, 2) => JournalMode::Wal,
            (w, r) => return Err(format!("unsupported file format versions {w}/{r}")),
        };
        Ok(Header {
            page_size,
            journal_mode,
        })
    }

    /// Checks page 1 of a stored version: an SQLite header (legal journal-mode bytes
    /// included) whose page size is `page_size` and whose page count, where SQLite
    /// trusts it (the version-valid-for number at 92–95 equals the change counter at
    /// 24–27), is `page_count`. The reason is returned when it is not.
    pub fn check_page1(
        page1: &[u8],
        page_size: u32,
        page_count: u32,
    ) -> std::result::Result<(), String> {
        let header = Header::parse(page1)?;
        if header.page_size != page_size {
            return Err(format!(
                "it gives a page size of {} but the version's pages have {page_size} bytes",
                header.page_size
            ));
        }
        let word = |at: usize| {
            u32::from_be_bytes([page1[at], page1[at + 1], page1[at + 2], page1[at + 3]])
        };
        if word(92) == word(24) && word(28) != page_count {
            return Err(format!(
                "it gives a page count of {} but the version has {page_count} pages",
                word(28)
            ));
        }
        Ok(())
    }

    /// Reads the header of the file at `path`: `Ok(None)` when the file is empty (an
    /// empty file is a database with no pages yet), an error when it is missing,
    /// unreadable or not an SQLite database.
    pub fn read(path: &Path) -> Result<Option<Header>> {
        use std::os::unix::fs::FileExt;
        // A kept handle: closing one of our own would drop other connections' locks.
        let file = super::handles::open(path, false).map_err(|e| Error::io(path, e))?;
        let mut buf = [0u8; 100];
        let mut len = 0;
        while len < buf.len() {
            match file.read_at(&mut buf[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        if len == 0 {
            return Ok(None);
        }
        Header::parse(&buf[..len])
            .map(Some)
            .map_err(|reason| Error::NotADatabase {
                path: path.to_owned(),
                reason,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(page_size_raw: u16, w: u8, r: u8) -> Vec<u8> {
        let mut h = vec![0u8; 100];
        h[..16].copy_from_slice(MAGIC);
        h[16..18].copy_from_slice(&page_size_raw.to_be_bytes());
        h[18] = w;
        h[19] = r;
        h
    }

    #[test]
    fn parses_page_size_and_mode() {
        let h = Header::parse(&header(4096, 2, 2)).expect("valid");
        assert_eq!((h.page_size, h.journal_mode), (4096, JournalMode::Wal));
        let h = Header::parse(&header(1, 1, 1)).expect("valid");
        assert_eq!(
            (h.page_size, h.journal_mode),
            (65536, JournalMode::Rollback)
        );
    }

    #[test]
    fn refuses_what_is_not_a_database() {
        assert!(Header::parse(b"hello").is_err());
        assert!(Header::parse(&[0u8; 100]).is_err());
        assert!(Header::parse(&header(3000, 1, 1)).is_err());
        assert!(Header::parse(&header(4096, 3, 3)).is_err());
        assert!(Header::parse(&header(4096, 0, 0)).is_err());
        assert!(Header::parse(&header(4096, 1, 2)).is_err());
    }

    #[test]
    fn page1_agrees_with_its_version() {
        let mut h = header(4096, 1, 1);
        h[24..28].copy_from_slice(&7u32.to_be_bytes());
        h[28..32].copy_from_slice(&10u32.to_be_bytes());
        h[92..96].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(Header::check_page1(&h, 4096, 10), Ok(()));
        assert!(
            Header::check_page1(&h, 4096, 11)
                .expect_err("count")
                .contains("page count")
        );
        assert!(
            Header::check_page1(&h, 8192, 10)
                .expect_err("size")
                .contains("page size")
        );
        // A stale page count (version-valid-for behind the counter) is not SQLite's
        // word, nor ours.
        h[95] = 6;
        assert_eq!(Header::check_page1(&h, 4096, 11), Ok(()));
        let mut bad = h.clone();
        bad[0] = b's';
        assert!(Header::check_page1(&bad, 4096, 10).is_err());
    }
}
