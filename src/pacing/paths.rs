//! `rate_limit.reporting_paths`: which paths are reporting endpoints.
//! Globs kept simple: `*` matches one path segment, `**` any number of
//! them (none included); anything else matches itself.

/// Criteo's report routes, behind any API version.
pub(crate) const DEFAULT_REPORTING_PATHS: [&str; 6] = [
    "/*/statistics/report",
    "/*/log-level/advertisers/*/report",
    "/*/placements/report",
    "/*/transactions/report",
    "/*/reports/**",
    "/*/retail-media/reports/**",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Globs(Vec<Box<str>>);

impl Globs {
    /// The globs, each checked: it starts with `/`, and a `*` stands for a
    /// whole segment.
    pub(crate) fn new(globs: &[String]) -> Result<Self, String> {
        for g in globs {
            if !g.starts_with('/') {
                return Err(format!("{g:?} must start with /"));
            }
            if g.split('/')
                .any(|seg| seg.contains('*') && seg != "*" && seg != "**")
            {
                return Err(format!(
                    "{g:?}: * and ** stand for whole path segments (/*/reports/**)"
                ));
            }
        }
        Ok(Self(globs.iter().map(|g| Box::from(g.as_str())).collect()))
    }

    pub(crate) fn as_strings(&self) -> Vec<String> {
        self.0.iter().map(|g| g.to_string()).collect()
    }

    /// True when one glob matches `path`. No allocation.
    pub(crate) fn matches(&self, path: &str) -> bool {
        self.0
            .iter()
            .any(|g| matches(g.split('/'), path.split('/')))
    }
}

fn matches<'a>(
    mut glob: impl Iterator<Item = &'a str> + Clone,
    mut path: impl Iterator<Item = &'a str> + Clone,
) -> bool {
    loop {
        match glob.next() {
            None => return path.next().is_none(),
            Some("**") => {
                // Any number of segments: try each rest of the path.
                loop {
                    if matches(glob.clone(), path.clone()) {
                        return true;
                    }
                    if path.next().is_none() {
                        return false;
                    }
                }
            }
            Some(g) => match path.next() {
                Some(p) if g == "*" && !p.is_empty() => {}
                Some(p) if g == p => {}
                _ => return false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Globs {
        let owned: Vec<String> = DEFAULT_REPORTING_PATHS
            .iter()
            .map(|s| s.to_string())
            .collect();
        Globs::new(&owned).unwrap()
    }

    #[test]
    fn criteo_report_routes_are_reporting_and_the_rest_is_not() {
        let g = defaults();
        for path in [
            "/2024-10/statistics/report",
            "/preview/log-level/advertisers/123/report",
            "/2025-01/placements/report",
            "/2025-01/transactions/report",
            "/2025-01/reports/abc/output",
            "/2025-01/retail-media/reports/campaigns",
        ] {
            assert!(g.matches(path), "{path}");
        }
        for path in [
            "/2024-10/advertisers/me",
            "/statistics/report",
            "/2024-10/statistics/report/extra",
            "/2024-10/log-level/advertisers/report",
            "/",
        ] {
            assert!(!g.matches(path), "{path}");
        }
    }

    #[test]
    fn a_star_inside_a_segment_or_a_relative_glob_is_refused() {
        assert!(Globs::new(&["/*/stat*".into()]).is_err());
        assert!(Globs::new(&["reports/**".into()]).is_err());
    }
}
