//! Request counts and latencies by route template, method and status: what
//! the metrics endpoint and the dashboard show of the HTTP side. Routes are
//! labelled by template (`/users/{id}`), never by raw path, and requests
//! that match no route share one label, so the label set stays bounded.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

use crate::tasks::series::{nanos, Buckets, Reading};

/// Bucket bounds (seconds) of the request latency histogram.
pub const HTTP_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const HTTP_BUCKETS_NS: [u64; HTTP_BUCKETS.len()] = nanos(HTTP_BUCKETS);
const _: () = assert!(HTTP_BUCKETS.len() < crate::tasks::series::MAX_SLOTS);

/// The route label of requests that matched no route.
pub const UNMATCHED: &str = "(unmatched)";

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER",
];

fn method_index(method: &http::Method) -> usize {
    METHODS[..7]
        .iter()
        .position(|m| *m == method.as_str())
        .unwrap_or(7)
}

#[derive(Default)]
struct Route {
    statuses: Vec<(u16, u64)>,
    timing: Buckets,
}

/// Keyed by handler index (None: unmatched) and method.
type Key = (Option<usize>, usize);

#[derive(Default)]
pub struct HttpMetrics {
    routes: Mutex<HashMap<Key, Route>>,
}

/// One route and method: its template, method, counts by status, and
/// latency as cumulative buckets, count and sum (seconds).
pub type RouteReading = (String, &'static str, Vec<(u16, u64)>, Vec<u64>, u64, f64);

impl HttpMetrics {
    pub fn record(
        &self,
        handler: Option<usize>,
        method: &http::Method,
        status: u16,
        took: Duration,
    ) {
        let mut routes = self.routes.lock();
        let route = routes.entry((handler, method_index(method))).or_default();
        match route.statuses.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => route.statuses.push((status, 1)),
        }
        route.timing.record(&HTTP_BUCKETS_NS, took);
    }

    /// Every route and method seen, sorted, with latency buckets at
    /// `HTTP_BUCKETS`; `template` names a handler.
    pub fn read<'a>(&self, template: impl Fn(usize) -> Option<&'a str>) -> Vec<RouteReading> {
        let mut out: Vec<RouteReading> = self
            .routes
            .lock()
            .iter()
            .map(|((handler, method), route)| {
                let name = handler.and_then(&template).unwrap_or(UNMATCHED).to_string();
                let mut statuses = route.statuses.clone();
                statuses.sort_unstable();
                let mut read = Reading::default();
                route.timing.add_to(&mut read);
                let (buckets, count, sum) = read.histogram(HTTP_BUCKETS.len());
                (name, METHODS[*method], statuses, buckets, count, sum)
            })
            .collect();
        out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_method_and_status() {
        let m = HttpMetrics::default();
        let ms = Duration::from_millis;
        m.record(Some(0), &http::Method::GET, 200, ms(1));
        m.record(Some(0), &http::Method::GET, 200, ms(3));
        m.record(Some(0), &http::Method::GET, 500, ms(30));
        m.record(Some(1), &http::Method::POST, 201, ms(2));
        m.record(None, &http::Method::GET, 404, ms(0));
        m.record(None, &"BREW".parse().unwrap(), 404, ms(0));
        let names = ["/users/{id}", "/users"];
        let read = m.read(|h| names.get(h).copied());
        // The cumulative counts at 2.5 ms and at 100 ms.
        let at = |b: f64| HTTP_BUCKETS.iter().position(|x| *x == b).unwrap();
        let brief: Vec<_> = read
            .iter()
            .map(|r| {
                let buckets = vec![r.3[at(0.0025)], r.3[at(0.1)]];
                (r.0.as_str(), r.1, r.2.clone(), buckets, r.4)
            })
            .collect();
        assert_eq!(
            brief,
            [
                (UNMATCHED, "GET", vec![(404, 1)], vec![1, 1], 1),
                (UNMATCHED, "OTHER", vec![(404, 1)], vec![1, 1], 1),
                ("/users", "POST", vec![(201, 1)], vec![1, 1], 1),
                (
                    "/users/{id}",
                    "GET",
                    vec![(200, 2), (500, 1)],
                    vec![1, 3],
                    3
                ),
            ]
        );
        assert!((read[3].5 - 0.034).abs() < 1e-9);
    }
}
