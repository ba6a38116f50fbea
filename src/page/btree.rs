//! A structural check of single b-tree pages: what can be said of one page without
//! walking the tree it belongs to.
//!
//! A push that follows the WAL reads only the pages that changed; running
//! `PRAGMA quick_check` over the whole file would cost what the WAL spared. Instead each
//! page read is checked here (SQLite's own page checks, the ones that need no other
//! page): the header of page 1, and for a b-tree page its cell count, content area,
//! cell pointers, freeblock chain and child page numbers. A page whose type byte is not
//! a b-tree type may be an overflow, freelist or pointer-map page, which only the tree
//! can tell: it passes. Any problem found sends the caller to the full `quick_check`,
//! which has the last word (docs/trust.md).

/// The first problem of page `pgno` (bytes `data`) of a database of `page_count` pages,
/// or `None` when it looks sound.
pub(super) fn check_page(pgno: u32, data: &[u8], page_count: u32) -> Option<String> {
    let page_size = data.len();
    let at = if pgno == 1 { 100 } else { 0 };
    if pgno == 1
        && let Err(e) = super::Header::check_page1(data, page_size as u32, page_count)
    {
        return Some(format!("page 1: {e}"));
    }
    let reserved = if pgno == 1 { usize::from(data[20]) } else { 0 };
    let usable = page_size.saturating_sub(reserved);
    let u16_at = |i: usize| usize::from(u16::from_be_bytes([data[i], data[i + 1]]));
    let u32_at = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let kind = data[at];
    let interior = match kind {
        2 | 5 => true,
        10 | 13 => false,
        _ if pgno == 1 => return Some(format!("page 1 is not a b-tree page (type {kind})")),
        _ => return None,
    };
    let bad = |what: String| Some(format!("page {pgno}: {what}"));
    let header = if interior { 12 } else { 8 };
    let cells = u16_at(at + 3);
    let content = match u16_at(at + 5) {
        0 => 65536,
        n => n,
    };
    let pointers_end = at + header + 2 * cells;
    if pointers_end > content || content > usable {
        return bad(format!(
            "{cells} cells and a content area at {content} do not fit"
        ));
    }
    let child_ok = |c: u32| (2..=page_count).contains(&c);
    if interior && !child_ok(u32_at(at + 8)) {
        return bad(format!("right child {} out of range", u32_at(at + 8)));
    }
    for k in 0..cells {
        let ptr = u16_at(at + header + 2 * k);
        if ptr < content || ptr + 4 > usable {
            return bad(format!(
                "cell {k} at offset {ptr} is outside the content area"
            ));
        }
        if interior {
            let child = u32_at(ptr);
            if !child_ok(child) {
                return bad(format!("cell {k} points to child page {child}"));
            }
        }
    }
    // The freeblock chain: ascending, inside the content area, no loops.
    let mut free = u16_at(at + 1);
    let mut last_end = 0;
    let mut steps = 0;
    while free != 0 {
        steps += 1;
        if free < content || free < last_end || free + 4 > usable || steps > usable / 4 {
            return bad(format!("freeblock at {free} is out of place"));
        }
        let size = u16_at(free + 2);
        if size < 4 || free + size > usable {
            return bad(format!("freeblock at {free} of {size} bytes does not fit"));
        }
        last_end = free + size;
        free = u16_at(free);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(cells: &[u16]) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        p[0] = 13;
        p[3..5].copy_from_slice(&(cells.len() as u16).to_be_bytes());
        p[5..7].copy_from_slice(&3000u16.to_be_bytes());
        for (k, c) in cells.iter().enumerate() {
            p[8 + 2 * k..10 + 2 * k].copy_from_slice(&c.to_be_bytes());
        }
        p
    }

    #[test]
    fn sound_pages_pass_and_damaged_ones_are_named() {
        assert_eq!(check_page(2, &leaf(&[3000, 3500]), 10), None);
        let damaged = check_page(2, &leaf(&[3000, 0xaaaa]), 10).expect("a problem");
        assert!(
            damaged.contains("page 2") && damaged.contains("cell 1"),
            "{damaged}"
        );
        let mut interior = leaf(&[3000]);
        interior[0] = 5;
        interior[8..12].copy_from_slice(&11u32.to_be_bytes());
        assert!(
            check_page(3, &interior, 10)
                .expect("child")
                .contains("right child")
        );
        // Not a b-tree page: only the tree could tell what it is.
        assert_eq!(check_page(4, &[0x55; 4096], 10), None);
        let mut looped = leaf(&[3000]);
        looped[1..3].copy_from_slice(&3200u16.to_be_bytes());
        looped[3200..3202].copy_from_slice(&3200u16.to_be_bytes());
        looped[3202..3204].copy_from_slice(&8u16.to_be_bytes());
        assert!(
            check_page(2, &looped, 10)
                .expect("loop")
                .contains("freeblock")
        );
    }
}
