//! `POST /{version}/statistics/report`: a report over the requested days,
//! dimensions and metrics, as CSV (`"format": "csv"`, Criteo's columns:
//! dimensions, `Currency`, metrics) or JSON. The numbers are made up but
//! stable, so a script's output can be compared from run to run.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{Map, Value, json};

use super::errors::criteo_error;
use super::{App, json_response};

/// The longest report, in days.
const MAX_DAYS: i64 = 31;

pub(super) fn statistics(app: &App, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let strings = |key: &str, default: &[&str]| -> Vec<String> {
        match request.get(key).and_then(Value::as_array) {
            Some(list) => list
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            None => default.iter().map(|s| (*s).to_owned()).collect(),
        }
    };
    let dimensions = strings("dimensions", &["AdvertiserId", "Day"]);
    let metrics = strings("metrics", &["Displays", "Clicks", "AdvertiserCost"]);
    let currency = request
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or("EUR");
    let today = unix_days();
    let day = |key: &str| {
        request
            .get(key)
            .and_then(Value::as_str)
            .and_then(parse_day)
            .unwrap_or(today)
    };
    let (start, end) = (day("startDate"), day("endDate"));
    let end = end.clamp(start, start + MAX_DAYS - 1);

    let mut columns = dimensions.clone();
    columns.push("Currency".into());
    columns.extend(metrics.iter().cloned());
    let rows: Vec<Map<String, Value>> = (start..=end)
        .enumerate()
        .map(|(i, d)| row(app, &dimensions, &metrics, currency, i as u64, d))
        .collect();

    match request
        .get("format")
        .and_then(Value::as_str)
        .unwrap_or("json")
    {
        "json" => json_response(
            StatusCode::OK,
            &json!({"Rows": rows, "Columns": columns, "echo": request}),
        ),
        "csv" => {
            let mut text = columns.join(",");
            text.push('\n');
            for r in &rows {
                let cells: Vec<String> = columns
                    .iter()
                    .map(|c| match &r[c] {
                        Value::String(s) => s.clone(),
                        v => v.to_string(),
                    })
                    .collect();
                text.push_str(&cells.join(","));
                text.push('\n');
            }
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/csv"));
            resp
        }
        other => criteo_error(
            StatusCode::BAD_REQUEST,
            "validation",
            "invalid",
            path,
            "Unsupported format",
            &format!("the sandbox writes csv and json reports, not {other:?}"),
        ),
    }
}

fn row(
    app: &App,
    dimensions: &[String],
    metrics: &[String],
    currency: &str,
    i: u64,
    day: i64,
) -> Map<String, Value> {
    let (id, name) = app.advertiser;
    let mut row = Map::new();
    for d in dimensions {
        let v = match d.as_str() {
            "Day" => format_day(day),
            "AdvertiserId" => id.to_owned(),
            "Advertiser" => name.to_owned(),
            other => format!("sandbox-{other}"),
        };
        row.insert(d.clone(), v.into());
    }
    row.insert("Currency".into(), currency.into());
    let displays = 10_000 + 1_237 * i;
    let clicks = displays / 80;
    for (j, m) in metrics.iter().enumerate() {
        let v = match m.as_str() {
            "Displays" => json!(displays),
            "Clicks" => json!(clicks),
            "AdvertiserCost" => json!((clicks * 42) as f64 / 100.0),
            _ => json!(100 * (j as u64 + 1) + i),
        };
        row.insert(m.clone(), v);
    }
    row
}

fn unix_days() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (secs / 86_400) as i64
}

/// `2026-11-24` (and any time after it) → days since 1970-01-01.
fn parse_day(s: &str) -> Option<i64> {
    let date = s.get(..10)?;
    let mut parts = date.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Days since 1970-01-01 → `2026-11-24` (Hinnant's civil_from_days).
fn format_day(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::APPS;

    #[test]
    fn days_round_trip() {
        for s in [
            "1970-01-01",
            "2000-02-29",
            "2024-10-31",
            "2026-11-24",
            "2027-01-01",
        ] {
            assert_eq!(format_day(parse_day(s).unwrap()), s);
        }
        assert_eq!(parse_day("1970-01-02T04:00:00.000Z"), Some(1));
        assert_eq!(parse_day("2024-13-01"), None);
    }

    #[test]
    fn a_csv_report_has_criteos_columns_and_one_row_per_day() {
        let body = br#"{"dimensions":["AdsetId","Day"],"metrics":["Displays","Clicks"],
            "startDate":"2020-09-10T04:00:00.000Z","endDate":"2020-09-12T04:00:00.000Z",
            "format":"csv","currency":"USD"}"#;
        let resp = statistics(&APPS[0], "/2027-01/statistics/report", body);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/csv");
        let text = futures_text(resp);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "AdsetId,Day,Currency,Displays,Clicks");
        assert_eq!(lines.len(), 4);
        assert!(lines[1].contains(",2020-09-10,USD,"), "{}", lines[1]);
        assert!(lines[3].contains(",2020-09-12,USD,"), "{}", lines[3]);
    }

    fn futures_text(resp: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt.block_on(resp.into_body().collect()).unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }
}
