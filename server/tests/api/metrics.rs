//! GetMetrics through the real coordinator: pages that a client follows to every point exactly
//! once, the default page size, per-series downsampling (`max_points`), and the limits on
//! `page_size`, `page_token` and `max_points`.
//!
//! Must not test how points are stored (see `workers.rs`).

use proto::metric::{TEST_LOSS, TRAIN_LOSS};
use proto::v1;
use tonic::Code;

use crate::helpers::{claim, point, submit, valid_spec, TestServer};

/// A job whose worker reported `train` train/loss points (steps 1..=train) and ten test/loss
/// points (one every 100 steps).
async fn job_with_points(server: &TestServer, train: u64) -> String {
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let lease = claim(&mut workers, &id).await;
    let mut points: Vec<v1::MetricPoint> = (1..=train)
        .map(|s| point(TRAIN_LOSS, s, 1.0 / s as f64))
        .collect();
    points.extend((1..=10).map(|i| point(TEST_LOSS, i * 100, i as f64)));
    for batch in points.chunks(10_000) {
        workers
            .report_metrics(v1::ReportMetricsRequest {
                lease: Some(lease.clone()),
                points: batch.to_vec(),
            })
            .await
            .expect("report");
    }
    id
}

#[tokio::test]
async fn get_metrics_answers_pages_of_1000_points_by_default_that_lead_to_every_point_once() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let id = job_with_points(&server, 2_500).await;
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = jobs
            .get_metrics(v1::GetMetricsRequest {
                job_id: id.clone(),
                page_token,
                ..Default::default()
            })
            .await
            .expect("a page")
            .into_inner();
        pages.push(page.points);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [1000, 1000, 510], "the default page is 1000 points");
    let all: Vec<(String, u64)> = pages
        .concat()
        .into_iter()
        .map(|p| (p.name, p.step))
        .collect();
    let want: Vec<(String, u64)> = (1..=10)
        .map(|i| (TEST_LOSS.to_string(), i * 100))
        .chain((1..=2_500).map(|s| (TRAIN_LOSS.to_string(), s)))
        .collect();
    assert_eq!(all, want, "every point once, in (name, step) order");
    server.stop().await;
}

#[tokio::test]
async fn get_metrics_with_max_points_selects_per_series_and_keeps_each_series_first_and_last() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let id = job_with_points(&server, 5_000).await;
    let page = jobs
        .get_metrics(v1::GetMetricsRequest {
            job_id: id.clone(),
            max_points: 100,
            ..Default::default()
        })
        .await
        .expect("downsampled")
        .into_inner();
    assert!(page.next_page_token.is_empty(), "110 points fit one page");
    let steps = |name: &str| -> Vec<u64> {
        page.points
            .iter()
            .filter(|p| p.name == name)
            .map(|p| p.step)
            .collect()
    };
    let train = steps(TRAIN_LOSS);
    assert_eq!(
        train.len(),
        100,
        "every target of a dense series is a point"
    );
    assert_eq!((train[0], train[99]), (1, 5_000));
    assert!(train.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        steps(TEST_LOSS),
        (1..=10).map(|i| i * 100).collect::<Vec<_>>(),
        "a series of 10 points comes whole"
    );
    // The same selection in pages of 30.
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = jobs
            .get_metrics(v1::GetMetricsRequest {
                job_id: id.clone(),
                page_size: 30,
                page_token,
                max_points: 100,
                ..Default::default()
            })
            .await
            .expect("a page")
            .into_inner();
        assert!(page.points.len() <= 30);
        paged.extend(page.points);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(paged, page.points);
    server.stop().await;
}

#[tokio::test]
async fn get_metrics_refuses_a_made_up_page_token_a_page_over_5000_and_max_points_out_of_range_naming_the_field(
) {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let id = job_with_points(&server, 10).await;
    // Two jobs, so that a ListJobs page of one has a next page.
    submit(&mut jobs, valid_spec()).await;
    let list_token = jobs
        .list_jobs(v1::ListJobsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .next_page_token;
    assert!(!list_token.is_empty());
    let cases = [
        ("page_token", 0, "not-a-token".to_string(), 0),
        ("page_token", 0, list_token, 0),
        ("page_size", 5_001, String::new(), 0),
        ("max_points", 0, String::new(), 1),
        ("max_points", 0, String::new(), 10_001),
    ];
    for (field, page_size, page_token, max_points) in cases {
        let err = jobs
            .get_metrics(v1::GetMetricsRequest {
                job_id: id.clone(),
                names: vec![],
                page_size,
                page_token: page_token.clone(),
                max_points,
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            err.message()
        );
    }
    let edge = jobs
        .get_metrics(v1::GetMetricsRequest {
            job_id: id,
            names: vec![TRAIN_LOSS.into()],
            page_size: 5_000,
            page_token: String::new(),
            max_points: 10_000,
        })
        .await
        .expect("the limits themselves are fine")
        .into_inner();
    assert_eq!(edge.points.len(), 10);
    server.stop().await;
}
