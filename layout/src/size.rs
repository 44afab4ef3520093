//! Byte sizes as users type them: `5GiB`, `128M`, `4096`.

/// Parses a size in bytes with an optional suffix, in any case: K/M/G/T or
/// KiB/MiB/GiB/TiB (all powers of 1024, as disk sizes are), B or none for bytes.
/// The one grammar of every size option (`ociblk`, `ociblk-bench`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a number of bytes, e.g. 5GiB or 128M"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown suffix {other:?} (use K, M, G, T, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("5GiB"), Ok(5 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        parse_size("").unwrap_err();
        parse_size("12X").unwrap_err();
        parse_size("-1").unwrap_err();
        parse_size("99999999999T").unwrap_err();
    }

    /// The sizes `ociblk-bench` is given, in any case; `KB` is refused.
    #[test]
    fn bench_sizes_and_any_case() {
        for (text, bytes) in [
            ("4096", 4096),
            ("4K", 4096),
            ("64k", 64 << 10),
            ("1M", 1 << 20),
            ("2GiB", 2 << 30),
            ("1m", 1 << 20),
            ("3gib", 3 << 30),
            ("512b", 512),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        // "1KB": ambiguous (1000 or 1024?).
        for bad in ["1X", "K", "99999999999T", "1KB"] {
            parse_size(bad).expect_err(bad);
        }
    }
}
