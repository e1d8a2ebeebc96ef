//! The HTTP service in process: scoring, multipart, heat maps, hostile bodies (4xx, never a
//! panic), limits before decoding, a full queue (503 + Retry-After), metrics and hot reload.

mod common;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use differnet::features::Extractor;
use differnet::serve::{router, AppState, BearerToken, Limits, ServedModel};
use http_body_util::BodyExt;
use std::sync::Arc;
use tower::ServiceExt;

fn served(name: &str, seed: u64) -> ServedModel {
    let extractor =
        Extractor::load(differnet::backbone::BackboneKind::EfficientnetLite0, &efficientnet_weights(), &candle_core::Device::Cpu).unwrap();
    let detector = differnet::pipeline::Detector::new(
        efficientnet_model(16, Some(1.0), seed),
        extractor,
        differnet::features::FeatureCache { dir: None },
    );
    ServedModel { name: name.into(), detector }
}

async fn call(state: &Arc<AppState>, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let res = router(state.clone()).oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
}

fn post(uri: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(uri).body(Body::from(body)).unwrap()
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A PNG whose (valid, CRC-correct) header claims `side`×`side` pixels and that has no data.
fn png_claiming(side: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png
}

fn multipart(parts: &[(&str, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = "differnet-test-boundary";
    let mut body = vec![];
    for (name, bytes) in parts {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_scores_refuses_hostile_input_and_reloads() {
    let limits = Limits {
        max_body_bytes: 300_000,
        max_pixels: 1_000_000,
        queue: 4,
        workers: 1,
        views: Some(1),
        heatmap_views: 1,
        ..Limits::default()
    };
    let loader: differnet::serve::Loader = Box::new(|| Ok(vec![served("part", 7)]));
    let state = AppState::start(vec![served("part", 3)], limits, Some(loader)).unwrap();

    let (status, _, body) = call(&state, Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["status"], "ok");

    // one raw image: score, decision at the stored threshold 1.0, model id
    let img = png_image(64, 48, 9);
    let (status, _, body) = call(&state, post("/v1/score", img.clone())).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let r = &json(&body)["results"][0];
    let score = r["score"].as_f64().unwrap();
    assert!(score.is_finite() && r["is_anomaly"] == (score >= 1.0) && r["threshold"] == 1.0 && r["model"] == "part");
    assert_eq!(r["model_id"].as_str().unwrap().len(), 16);
    // the same image scores the same
    let (_, _, again) = call(&state, post("/v1/score", img.clone())).await;
    assert_eq!(json(&again)["results"][0]["score"].as_f64().unwrap(), score);

    // multipart with two images, and a heat map overlay at the image's size
    let (ctype, body) = multipart(&[("a.png", img.clone()), ("b.png", png_image(40, 40, 3))]);
    let req = Request::post("/v1/score?heatmap=1").header("content-type", ctype).body(Body::from(body)).unwrap();
    let (status, _, body) = call(&state, req).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let results = json(&body)["results"].as_array().unwrap().clone();
    assert_eq!(results.iter().map(|r| r["name"].as_str().unwrap()).collect::<Vec<_>>(), ["a.png", "b.png"]);
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(results[1]["overlay_png_base64"].as_str().unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 40);

    // hostile bodies: each a 4xx with a reason, none a 5xx
    let mut truncated = img.clone();
    truncated.truncate(img.len() / 2);
    let mut flipped = img.clone();
    flipped[60] ^= 0xFF;
    let bmp_bomb = {
        let mut b = b"BM".to_vec();
        b.extend(0u32.to_le_bytes());
        b.extend([0u8; 4]);
        b.extend(54u32.to_le_bytes());
        b.extend(40u32.to_le_bytes());
        b.extend(60_000i32.to_le_bytes());
        b.extend(60_000i32.to_le_bytes());
        b.extend(1u16.to_le_bytes());
        b.extend(24u16.to_le_bytes());
        b.extend([0u8; 24]);
        b
    };
    let cases: Vec<(&str, Vec<u8>, StatusCode)> = vec![
        ("empty", vec![], StatusCode::BAD_REQUEST),
        ("text", b"this is not an image".to_vec(), StatusCode::UNPROCESSABLE_ENTITY),
        ("truncated png", truncated, StatusCode::UNPROCESSABLE_ENTITY),
        ("bit-flipped png", flipped, StatusCode::UNPROCESSABLE_ENTITY),
        ("png claiming 100000x100000", png_claiming(100_000), StatusCode::PAYLOAD_TOO_LARGE),
        ("bmp claiming 60000x60000", bmp_bomb, StatusCode::PAYLOAD_TOO_LARGE),
        ("body over the limit", vec![0u8; 400_000], StatusCode::PAYLOAD_TOO_LARGE),
    ];
    for (what, body, want) in cases {
        let (status, _, body) = call(&state, post("/v1/score", body)).await;
        assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(&body));
    }
    let (status, _, body) = call(&state, post("/v1/score?model=nope", img.clone())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&body).contains("part"));

    // metrics: counts by status, the latency histogram
    let (_, headers, body) = call(&state, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    let text = String::from_utf8(body).unwrap();
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert!(text.contains("differnet_requests_total{route=\"/v1/score\",status=\"200\"} 3"), "{text}");
    assert!(text.contains("differnet_requests_total{route=\"/v1/score\",status=\"413\"} 3"), "{text}");
    assert!(text.contains("differnet_score_seconds_count 3") && text.contains("differnet_images_scored_total 4"), "{text}");

    // hot reload: the new model answers, with a different id
    let (_, _, before) = call(&state, Request::get("/v1/model").body(Body::empty()).unwrap()).await;
    assert_eq!(state.reload().unwrap(), 1);
    let (_, _, after) = call(&state, Request::get("/v1/model").body(Body::empty()).unwrap()).await;
    let sha = |v: &[u8]| json(v)["models"]["part"]["parameters_sha256"].as_str().unwrap().to_string();
    assert_ne!(sha(&before), sha(&after));
    let (status, _, body) = call(&state, post("/v1/score", img.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["results"][0]["model_id"].as_str().unwrap(), &sha(&after)[..16]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_503_with_retry_after() {
    // no workers and a queue of one: the first request waits, the second is refused at once
    let limits = Limits { queue: 1, workers: 0, views: Some(1), ..Limits::default() };
    let state = AppState::start(vec![served("part", 3)], limits, None).unwrap();
    let img = png_image(32, 32, 1);
    let waiting = tokio::spawn({
        let state = state.clone();
        let img = img.clone();
        async move { call(&state, post("/v1/score", img)).await }
    });
    while state.queue_depth() < 1 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (status, headers, _) = call(&state, post("/v1/score", img)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    let (_, _, body) = call(&state, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("differnet_rejected_busy_total 1") && text.contains("differnet_queue_depth 1"), "{text}");
    waiting.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_routes_need_the_token_and_probes_do_not() {
    let limits = Limits { views: Some(1), token: Some(BearerToken::new("s3cret-token\n").unwrap()), ..Limits::default() };
    // the token is never printed
    assert!(!format!("{limits:?}").contains("s3cret"));
    let state = AppState::start(vec![served("part", 3)], limits, None).unwrap();
    let img = png_image(32, 32, 1);
    let with = |auth: Option<&str>, req: axum::http::request::Builder, body: Vec<u8>| {
        let req = match auth {
            Some(a) => req.header("authorization", a),
            None => req,
        };
        req.body(Body::from(body)).unwrap()
    };
    for auth in [None, Some("Bearer wrong-token!"), Some("Bearer s3cret-toke"), Some("s3cret-token"), Some("Basic s3cret-token")] {
        let (status, headers, _) = call(&state, with(auth, Request::post("/v1/score"), img.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert_eq!(call(&state, with(auth, Request::get("/v1/model"), vec![])).await.0, StatusCode::UNAUTHORIZED, "{auth:?}");
    }
    let (status, _, body) = call(&state, with(Some("Bearer s3cret-token"), Request::post("/v1/score"), img)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(call(&state, with(None, Request::get("/healthz"), vec![])).await.0, StatusCode::OK);
    // the Open Inference Protocol's probes are open, its model routes are not
    assert_eq!(call(&state, with(None, Request::get("/v2/health/live"), vec![])).await.0, StatusCode::OK);
    assert_eq!(call(&state, with(None, Request::get("/v2/health/ready"), vec![])).await.0, StatusCode::OK);
    assert_eq!(call(&state, with(None, Request::get("/v2/models/part"), vec![])).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&state, with(None, Request::post("/v2/models/part/infer"), b"{}".to_vec())).await.0, StatusCode::UNAUTHORIZED);
    let (status, _, body) = call(&state, with(None, Request::get("/metrics"), vec![])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8(body).unwrap().contains("status=\"401\""));
    assert!(BearerToken::new(" \n").is_err() && BearerToken::new("two words").is_err());
}

/// A KServe v2 infer request with the images as one BYTES input in the binary tensor extension:
/// (JSON length, body).
fn v2_binary_request(images: &[Vec<u8>], outputs: Option<serde_json::Value>) -> (usize, Vec<u8>) {
    let mut data = vec![];
    for img in images {
        data.extend((img.len() as u32).to_le_bytes());
        data.extend(img);
    }
    let mut head = serde_json::json!({
        "id": "req-7",
        "inputs": [{"name": "input", "shape": [images.len()], "datatype": "BYTES", "parameters": {"binary_data_size": data.len()}}],
    });
    match outputs {
        Some(o) => head["outputs"] = o,
        None => head["parameters"] = serde_json::json!({"binary_data_output": true}),
    }
    let mut body = serde_json::to_vec(&head).unwrap();
    let n = body.len();
    body.extend(data);
    (n, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_inference_protocol_scores_as_v1_does_and_refuses_what_v1_refuses() {
    use base64::Engine;
    let limits = Limits { max_body_bytes: 300_000, max_pixels: 1_000_000, views: Some(1), ..Limits::default() };
    let mut model = served("part", 3);
    model.detector.model.manifest.score_range = Some(differnet::model::ScoreRange { min: 0.5, max: 2.0 });
    let state = AppState::start(vec![model], limits, None).unwrap();
    let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
    let (status, _, body) = call(&state, get("/v2/health/live")).await;
    assert_eq!((status, json(&body)["live"].clone()), (StatusCode::OK, serde_json::json!(true)));
    let (status, _, body) = call(&state, get("/v2/health/ready")).await;
    assert_eq!((status, json(&body)["ready"].clone()), (StatusCode::OK, serde_json::json!(true)));
    let (status, _, body) = call(&state, get("/v2/models/part")).await;
    assert_eq!(status, StatusCode::OK);
    let meta = json(&body);
    assert_eq!(meta["inputs"][0]["datatype"], "BYTES");
    let outs: Vec<&str> = meta["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(outs, ["score", "pred_score", "pred_label"]);
    assert_eq!(call(&state, get("/v2/models/part/ready")).await.0, StatusCode::OK);
    assert_eq!(call(&state, get("/v2/models/part/versions/1/ready")).await.0, StatusCode::OK);
    assert_eq!(call(&state, get("/v2/models/part/versions/2/ready")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&state, get("/v2/models/other/ready")).await.0, StatusCode::NOT_FOUND);

    let (a, b) = (png_image(64, 48, 9), png_image(40, 40, 3));
    let v1 = |img: Vec<u8>| {
        let state = state.clone();
        async move {
            let (_, _, body) = call(&state, post("/v1/score", img)).await;
            let r = json(&body)["results"][0].clone();
            (r["score"].as_f64().unwrap(), r["pred_score"].as_f64().unwrap(), r["pred_label"].as_bool().unwrap())
        }
    };
    let (want_a, want_b) = (v1(a.clone()).await, v1(b.clone()).await);

    // JSON: base64 elements, JSON outputs
    let b64 = |x: &[u8]| base64::engine::general_purpose::STANDARD.encode(x);
    let req = serde_json::json!({"inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": [b64(&a), b64(&b)]}]});
    let (status, _, body) = call(&state, post("/v2/models/part/infer", serde_json::to_vec(&req).unwrap())).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let r = json(&body);
    assert_eq!(r["model_name"], "part");
    let out = |name: &str| r["outputs"].as_array().unwrap().iter().find(|o| o["name"] == name).unwrap()["data"].clone();
    assert_eq!(out("score"), serde_json::json!([want_a.0, want_b.0]));
    assert_eq!(out("pred_score"), serde_json::json!([want_a.1, want_b.1]));
    assert_eq!(out("pred_label"), serde_json::json!([want_a.2, want_b.2]));

    // binary extension both ways: FP64 and BOOL outputs as little-endian bytes after the JSON
    let (n, body) = v2_binary_request(&[a.clone(), b.clone()], None);
    let req =
        Request::post("/v2/models/part/infer").header("inference-header-content-length", n.to_string()).body(Body::from(body)).unwrap();
    let (status, headers, body) = call(&state, req).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let json_len: usize = headers["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let head = json(&body[..json_len]);
    assert_eq!(head["id"], "req-7");
    let mut data = &body[json_len..];
    let mut got = std::collections::BTreeMap::new();
    for o in head["outputs"].as_array().unwrap() {
        let size = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        got.insert(o["name"].as_str().unwrap().to_string(), data[..size].to_vec());
        data = &data[size..];
    }
    assert!(data.is_empty());
    let f64s = |v: &[u8]| v.chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
    assert_eq!(f64s(&got["score"]), [want_a.0, want_b.0]);
    assert_eq!(f64s(&got["pred_score"]), [want_a.1, want_b.1]);
    assert_eq!(got["pred_label"], [want_a.2 as u8, want_b.2 as u8]);
    // one output asked for, in JSON
    let (n, body) = v2_binary_request(std::slice::from_ref(&a), Some(serde_json::json!([{"name": "score"}])));
    let req =
        Request::post("/v2/models/part/infer").header("inference-header-content-length", n.to_string()).body(Body::from(body)).unwrap();
    let (status, _, body) = call(&state, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["outputs"], serde_json::json!([{"name": "score", "datatype": "FP64", "shape": [1], "data": [want_a.0]}]));

    // refused as /v1/score refuses: junk 422, a bomb 413, a large body 413; malformed requests 400
    let infer_binary = |images: Vec<Vec<u8>>| {
        let state = state.clone();
        async move {
            let (n, body) = v2_binary_request(&images, None);
            let req = Request::post("/v2/models/part/infer")
                .header("inference-header-content-length", n.to_string())
                .body(Body::from(body))
                .unwrap();
            let (status, _, body) = call(&state, req).await;
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (status, body) = infer_binary(vec![b"not an image at all".to_vec()]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.contains("input[0]"), "{body}");
    assert_eq!(infer_binary(vec![a.clone(), png_claiming(100_000)]).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(infer_binary(vec![vec![0u8; 400_000]]).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let bad = |req: serde_json::Value| {
        let state = state.clone();
        async move { call(&state, post("/v2/models/part/infer", serde_json::to_vec(&req).unwrap())).await.0 }
    };
    let input = |shape: serde_json::Value, datatype: &str, data: serde_json::Value| serde_json::json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]});
    assert_eq!(bad(input(serde_json::json!([2]), "BYTES", serde_json::json!([b64(&a)]))).await, StatusCode::BAD_REQUEST);
    assert_eq!(bad(input(serde_json::json!([1]), "BYTES", serde_json::json!(["%%%"]))).await, StatusCode::BAD_REQUEST);
    assert_eq!(bad(input(serde_json::json!([1]), "FP16", serde_json::json!([0.5]))).await, StatusCode::BAD_REQUEST);
    assert_eq!(bad(input(serde_json::json!([-1]), "BYTES", serde_json::json!([b64(&a)]))).await, StatusCode::BAD_REQUEST);
    assert_eq!(bad(serde_json::json!({"inputs": []})).await, StatusCode::BAD_REQUEST);
    let mut wrong_output = input(serde_json::json!([1]), "BYTES", serde_json::json!([b64(&a)]));
    wrong_output["outputs"] = serde_json::json!([{"name": "logits"}]);
    assert_eq!(bad(wrong_output).await, StatusCode::BAD_REQUEST);
    let req = Request::post("/v2/models/part/infer").header("inference-header-content-length", "999999").body(Body::from("{}")).unwrap();
    assert_eq!(call(&state, req).await.0, StatusCode::BAD_REQUEST);
    let mut truncated = v2_binary_request(std::slice::from_ref(&a), None);
    truncated.1.truncate(truncated.1.len() - 10);
    let req = Request::post("/v2/models/part/infer")
        .header("inference-header-content-length", truncated.0.to_string())
        .body(Body::from(truncated.1))
        .unwrap();
    assert_eq!(call(&state, req).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(call(&state, post("/v2/models/other/infer", b"{}".to_vec())).await.0, StatusCode::NOT_FOUND);
}

/// Reads from `s` until the server closes it; the bytes read.
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = vec![];
    let _ = s.read_to_end(&mut out).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_a_normal_request_is_still_answered() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let timeout = Duration::from_millis(800);
    let limits = Limits { views: Some(1), max_connections: 4, read_timeout: timeout, ..Limits::default() };
    let state = AppState::start(vec![served("part", 3)], limits, None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(differnet::serve::serve_until(state.clone(), listener, async {
        let _ = stopped.await;
    }));
    let start = Instant::now();
    // every connection slot taken: three clients that never finish their headers, one that
    // sends its headers and only part of the body it announced
    let mut slow = vec![];
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Le").await.unwrap();
        slow.push(s);
    }
    let mut trickle = TcpStream::connect(addr).await.unwrap();
    trickle.write_all(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nabc").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // a normal request waits for a slot, then is answered
    let img = png_image(32, 32, 1);
    let normal = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", img.len());
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&img).await.unwrap();
        (String::from_utf8_lossy(&read_until_closed(&mut s).await).into_owned(), start.elapsed())
    });
    let (reply, answered_after) =
        tokio::time::timeout(Duration::from_secs(20), normal).await.expect("the normal request was answered").unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // it could not have been answered before a slow client's slot was freed by the timeout
    assert!(answered_after >= timeout.mul_f64(0.9), "answered after {answered_after:?}, before any slot was freed");
    // the slow clients were disconnected by the server: headers cut off, the trickled body answered 408
    for mut s in slow {
        let got = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut s)).await.expect("a slow client was disconnected");
        assert!(got.is_empty() || String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&got));
    }
    let got = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut trickle))
        .await
        .expect("the trickling client was disconnected");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&got));
    // an idle kept-alive connection is closed too
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut idle)).await.expect("an idle connection was closed");
    assert!(got.is_empty() || String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("the server stopped").unwrap().unwrap();
}

/// Requests waiting together share one flow pass (`Limits::batch_images`): their scores equal
/// those of each image scored alone, and an unreadable image among them costs only its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_scored_together_with_the_same_scores() {
    let images: Vec<Vec<u8>> = (0..6u8).map(|i| png_image(64 + 8 * i as u32, 48, 20 + i)).collect();
    let model = served("part", 5);
    let d = &model.detector;
    let views = d.views(Some(1));
    let decoded: Vec<_> = images.iter().map(|b| differnet::views::decode_rgb(b).unwrap()).collect();
    let alone: Vec<f64> = decoded.iter().map(|img| d.score_image(img, &views).unwrap()).collect();
    let together = d.score_batch(&decoded, &views).unwrap();
    for (a, t) in alone.iter().zip(&together) {
        assert!((a - t).abs() <= 1e-5 * a.abs().max(1.0), "alone {a}, in a batch {t}");
    }

    let limits = Limits { workers: 1, views: Some(1), batch_images: 8, ..Limits::default() };
    let state = AppState::start(vec![model], limits, None).unwrap();
    // a junk body and a heat-map request among them: neither may change the others' answers
    let mut bodies: Vec<(&str, Vec<u8>)> = images.iter().map(|b| ("/v1/score", b.clone())).collect();
    bodies.insert(3, ("/v1/score", b"not an image".to_vec()));
    bodies.insert(5, ("/v1/score?heatmap=1", images[0].clone()));
    let pending: Vec<_> = bodies
        .into_iter()
        .map(|(uri, b)| {
            let state = state.clone();
            tokio::spawn(async move { call(&state, post(uri, b)).await })
        })
        .collect();
    let mut answers = vec![];
    for p in pending {
        answers.push(p.await.unwrap());
    }
    let mut expected = alone.iter();
    for (i, (status, _, body)) in answers.iter().enumerate() {
        if i == 3 {
            assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY, "{}", String::from_utf8_lossy(body));
            continue;
        }
        assert_eq!(*status, StatusCode::OK, "{}", String::from_utf8_lossy(body));
        let result = &json(body)["results"][0];
        let score = result["score"].as_f64().unwrap();
        let a = if i == 5 {
            assert!(result["overlay_png_base64"].as_str().is_some_and(|s| !s.is_empty()), "request {i} asked for a heat map");
            &alone[0]
        } else {
            assert!(result.get("overlay_png_base64").is_none_or(|v| v.is_null()), "request {i} asked for no heat map");
            expected.next().unwrap()
        };
        assert!((a - score).abs() <= 1e-5 * a.abs().max(1.0), "request {i}: alone {a}, served {score}");
    }
}
