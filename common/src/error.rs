//! Errors as people read them: with every cause.

/// An error and each of its sources, outermost first, joined by ": " (the house style keeps
/// a `#[source]` out of its error's own message, so printing only the outer error would
/// lose the cause).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        // Some errors repeat their source in their message; say it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot write the record")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_cause_is_told_once() {
        let e = Outer(std::io::Error::other("disk full"));
        assert_eq!(super::chain(&e), "cannot write the record: disk full");
        let plain = std::io::Error::other("disk full");
        assert_eq!(super::chain(&plain), "disk full");
    }
}
