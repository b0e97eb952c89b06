//! Region names: one rule for the whole product. An account's home `region` and its further
//! `regions` (config document, control plane) and an edge's `region` (plugin configuration) are
//! all checked by [`valid_region`].

/// Longest region name.
pub const MAX_REGION_LEN: usize = 32;

/// What a valid region name is, as error messages say it.
pub const REGION_RULE: &str = "must be 1 to 32 lowercase letters, digits or '-'";

/// Whether `name` may name a region: 1 to [`MAX_REGION_LEN`] bytes of `a-z 0-9 -` (so it goes
/// into a URL query or a header as it is).
pub fn valid_region(name: &str) -> bool {
    (1..=MAX_REGION_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn lowercase_letters_digits_and_dashes_up_to_32() {
        let longest = "a".repeat(32);
        for good in ["us1", "in1", "eu-central-1", "-", "0", longest.as_str()] {
            assert!(valid_region(good), "{good:?}");
        }
        let too_long = "a".repeat(33);
        for bad in [
            "",
            too_long.as_str(),
            "US1",
            "us_1",
            "us.1",
            "us 1",
            "us1&x=y",
            "é",
        ] {
            assert!(!valid_region(bad), "{bad:?}");
        }
    }
}
