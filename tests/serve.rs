//! The OpenAI-compatible server, started on loopback with a fixture model and driven by a real
//! HTTP client.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Server, model_dir, start_server};
use serde_json::{Value, json};

const MODEL: &str = "tiny-internvl";

fn start(extra: &[&str]) -> Server {
    start_server("internvl3-hf", MODEL, extra)
}

fn image_part(name: &str) -> Value {
    let path = common::fixture_image(name);
    let data = base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap());
    json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}})
}

fn request(question: &str, images: &[&str]) -> Value {
    let mut content = vec![json!({"type": "text", "text": question})];
    content.extend(images.iter().map(|name| image_part(name)));
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0})
}

/// POSTs JSON; returns status, body and the Retry-After header.
fn post(server: &Server, body: &Value) -> (u16, Value, Option<String>) {
    post_raw(server, &body.to_string(), None)
}

fn post_raw(server: &Server, body: &str, key: Option<&str>) -> (u16, Value, Option<String>) {
    let mut call = ureq::post(&format!("{}/v1/chat/completions", server.url)).set("content-type", "application/json");
    if let Some(key) = key {
        call = call.set("authorization", &format!("Bearer {key}"));
    }
    let response = match call.send_string(body) {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("transport error: {error}"),
    };
    let status = response.status();
    let retry_after = response.header("retry-after").map(String::from);
    let body: Value = serde_json::from_str(&response.into_string().unwrap()).unwrap();
    (status, body, retry_after)
}

/// The library's greedy answer to the same prompt (images first, as the server puts them).
fn expected_answer(question: &str, images: &[&str]) -> String {
    let vlm = vlm::Vlm::from_dir(&model_dir("internvl3-hf"), &vlm::device::cpu()).unwrap();
    expected_with(&vlm, question, images)
}

fn expected_with(vlm: &vlm::Vlm, question: &str, images: &[&str]) -> String {
    let mut message = vlm::Message::user();
    for name in images {
        let path = common::fixture_image(name);
        message = message.image(vlm::Image::open(path).unwrap());
    }
    let messages = [message.text(question)];
    let config = vlm::GenerationConfig::default().max_new_tokens(6).temperature(0.0);
    vlm.generate(&messages, &config).unwrap().text
}

/// POSTs `body` over a plain socket in 64 KiB pieces, then reads the whole answer: how a client
/// uploading a large body over a slow link sees the server.
fn post_in_pieces(server: &Server, body: &str) -> (u16, Value) {
    let address = server.url.strip_prefix("http://").unwrap();
    let mut socket = std::net::TcpStream::connect(address).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).unwrap();
    for piece in body.as_bytes().chunks(64 << 10) {
        socket.write_all(piece).unwrap_or_else(|e| panic!("the server hung up mid-upload: {e}"));
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {answer:?}"));
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("{head:?}"));
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}")))
}

/// Appends a content part to the first message of a request.
fn push_part(request: &mut Value, part: Value) {
    request["messages"][0]["content"].as_array_mut().unwrap().push(part);
}

fn answer(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error object: {body}"))
}

#[test]
fn completion_with_an_image_after_the_text_matches_the_library() {
    let server = start(&[]);
    let (status, body, _) = post(&server, &request("What is in this image?", &["square.png"]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert_eq!(answer(&body), expected_answer("What is in this image?", &["square.png"]));
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 6);
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().unwrap() + 6));
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[test]
fn two_images_in_one_message() {
    let server = start(&[]);
    let (status, body, _) = post(&server, &request("Compare them.", &["wide.png", "tall.png"]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer(&body), expected_answer("Compare them.", &["wide.png", "tall.png"]));
    // 4 + 4 tiles of 16 tokens
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 128);
}

/// Reads an SSE response into its `data:` payloads.
fn sse_events(reader: impl Read) -> Vec<String> {
    BufReader::new(reader)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| line.strip_prefix("data: ").map(String::from))
        .collect()
}

#[test]
fn stream_sends_openai_chunks_that_add_up_to_the_answer() {
    let server = start(&[]);
    let mut body = request("Describe it.", &["wide.png"]);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["max_tokens"] = json!(6);
    let response = ureq::post(&format!("{}/v1/chat/completions", server.url)).send_json(body).unwrap();
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let events = sse_events(response.into_reader());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(text, expected_answer("Describe it.", &["wide.png"]));
    let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("length"));
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
}

#[test]
fn bad_requests_get_error_objects_and_the_server_keeps_serving() {
    let server = start(&["--max-body-mib", "4", "--max-image-mib", "1"]);
    let ok = |server: &Server| {
        let (status, body, _) = post(server, &request("Still there?", &[]));
        assert_eq!(status, 200, "{body}");
    };

    let (status, body, _) = post_raw(&server, "{\"messages\": [", None);
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
    ok(&server);

    let (status, body, _) = post(&server, &json!({"messages": "hello", "max_tokens": "many"}));
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
    ok(&server);

    let (status, body, _) = post(&server, &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!((status, error_code(&body)), (404, "model_not_found"));
    ok(&server);

    let garbage = base64::engine::general_purpose::STANDARD.encode(b"this is not a picture");
    let mut bad_image = request("What?", &[]);
    push_part(
        &mut bad_image,
        json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{garbage}")}}),
    );
    let (status, body, _) = post(&server, &bad_image);
    assert_eq!((status, error_code(&body)), (400, "invalid_image"));
    ok(&server);

    // An image over --max-image-mib (but within the body limit).
    let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 3 << 19]);
    let mut oversized = request("What?", &[]);
    push_part(
        &mut oversized,
        json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{big}")}}),
    );
    let (status, body, _) = post(&server, &oversized);
    assert_eq!((status, error_code(&body)), (400, "image_too_large"));
    ok(&server);

    // A body over --max-body-mib, larger than the sockets' buffers: the client still gets the 413.
    let huge = json!({"messages": [{"role": "user", "content": "x".repeat(24 << 20)}]});
    let (status, body) = post_in_pieces(&server, &huge.to_string());
    assert_eq!((status, error_code(&body)), (413, "request_too_large"));
    ok(&server);

    // A prompt over the model's 512-token context.
    let long = json!({"messages": [{"role": "user", "content": "the quick brown fox ".repeat(300)}]});
    let (status, body, _) = post(&server, &long);
    assert_eq!((status, error_code(&body)), (400, "context_length_exceeded"));
    ok(&server);

    let (status, body, _) = post(&server, &json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}));
    assert_eq!(status, 400, "{body}");
    let (status, body, _) = post(&server, &json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 5}));
    assert_eq!(status, 400, "{body}");
    let (status, body, _) = post(&server, &json!({"messages": []}));
    assert_eq!(status, 400, "{body}");
    ok(&server);
}

#[test]
fn burst_of_64_concurrent_requests_is_answered_in_batches() {
    let server = start(&["--max-batch", "16"]);
    let questions: Vec<String> = (0..8).map(|i| format!("Question number {i}: what is shown?")).collect();
    let images = [&["square.png"][..], &[], &["tiny.png"], &["wide.png"]];
    let requests: Vec<(String, &[&str])> = (0..64).map(|i| (questions[i % 8].clone(), images[(i / 8) % 4])).collect();

    let started = Instant::now();
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|(question, images)| {
                let server = &server;
                scope.spawn(move || {
                    let (status, body, _) = post(server, &request(question, images));
                    (status, body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let burst = started.elapsed();

    let vlm = vlm::Vlm::from_dir(&model_dir("internvl3-hf"), &vlm::device::cpu()).unwrap();
    let mut expected = std::collections::HashMap::new();
    for ((question, images), (status, body)) in requests.iter().zip(&answers) {
        assert_eq!(*status, 200, "{body}");
        let want = expected
            .entry((question.clone(), images.to_vec()))
            .or_insert_with(|| expected_with(&vlm, question, images))
            .clone();
        assert_eq!(answer(body), want, "{question} {images:?}");
    }
    let health: Value = ureq::get(&format!("{}/health", server.url)).call().unwrap().into_json().unwrap();
    assert!(health["largest_batch"].as_u64().unwrap() > 1, "{health}");
    assert_eq!(health["completed"], 64);
    eprintln!("64 requests in {burst:?}: {health}");
}

#[test]
fn full_queue_answers_503_with_retry_after() {
    let server = start(&["--max-queue", "2", "--max-batch", "1"]);
    let long = |i: usize| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": format!("Story {i}")}],
               "max_tokens": 200, "temperature": 0})
    };
    let results: Vec<(u16, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let server = &server;
                let body = long(i);
                scope.spawn(move || {
                    let (status, _, retry) = post(server, &body);
                    (status, retry)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let rejected: Vec<_> = results.iter().filter(|(status, _)| *status == 503).collect();
    assert!(!rejected.is_empty(), "{results:?}");
    assert!(rejected.iter().all(|(_, retry)| retry.as_deref() == Some("1")));
    assert!(results.iter().any(|(status, _)| *status == 200));
    let (status, body, _) = post(&server, &request("After the rush", &[]));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn client_that_disconnects_mid_stream_frees_its_slot() {
    let server = start(&["--max-queue", "1"]);
    let address = server.url.trim_start_matches("http://").to_string();
    let body = json!({"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 480,
                      "temperature": 0, "stream": true})
    .to_string();
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    write!(
        socket,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Wait for the first chunk of content, then hang up.
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let mut line = String::new();
    while !line.contains("\"content\":\"") || line.contains("\"role\"") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    drop(reader);
    socket.shutdown(std::net::Shutdown::Both).unwrap();
    drop(socket);

    // The only slot frees within a few decode steps, long before 480 tokens would be done.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body, _) = post(&server, &request("Next client", &[]));
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "the disconnected client kept its slot");
        std::thread::sleep(Duration::from_millis(50));
    }
    let health: Value = ureq::get(&format!("{}/health", server.url)).call().unwrap().into_json().unwrap();
    assert_eq!(health["completed"], 1, "the abandoned stream is not counted as answered: {health}");
}

#[test]
fn api_key_is_required_when_set() {
    let server = start(&["--api-key", "s3cret"]);
    let body = request("hi", &[]).to_string();
    let (status, reply, _) = post_raw(&server, &body, None);
    assert_eq!((status, error_code(&reply)), (401, "invalid_api_key"));
    let (status, _, _) = post_raw(&server, &body, Some("wrong"));
    assert_eq!(status, 401);
    let (status, reply, _) = post_raw(&server, &body, Some("s3cret"));
    assert_eq!(status, 200, "{reply}");
    let models = ureq::get(&format!("{}/v1/models", server.url)).call();
    assert!(matches!(models, Err(ureq::Error::Status(401, _))));
    let models: Value = ureq::get(&format!("{}/v1/models", server.url))
        .set("authorization", "Bearer s3cret")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(ureq::get(&format!("{}/health", server.url)).call().unwrap().status(), 200);
}

#[test]
fn http_image_urls_are_fetched_within_limits() {
    // A one-shot-per-connection HTTP server for the test image.
    let png = std::fs::read(common::fixture_image("square.png")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let image_server = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap_or(0);
            let path = String::from_utf8_lossy(&request[..n]).split_whitespace().nth(1).unwrap_or("").to_string();
            let body = if path == "/big.png" { vec![0u8; 3 << 20] } else { png.clone() };
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body));
        }
    });
    let server = start(&["--max-image-mib", "2"]);
    let with_url = |url: String| {
        let mut body = request("What is in this image?", &[]);
        push_part(&mut body, json!({"type": "image_url", "image_url": {"url": url}}));
        body
    };
    let (status, body, _) = post(&server, &with_url(format!("http://{image_server}/square.png")));
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer(&body), expected_answer("What is in this image?", &["square.png"]));
    let (status, body, _) = post(&server, &with_url(format!("http://{image_server}/big.png")));
    assert_eq!((status, error_code(&body)), (400, "image_too_large"));
    let (status, body, _) = post(&server, &with_url("ftp://example.com/x.png".into()));
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
}

#[test]
fn decoded_pixels_and_tiles_are_bounded_with_413s_naming_the_limit() {
    // large.png is a 19 KB file of 500 x 375 = 187,500 pixels; a small file can hold a huge image.
    let server = start(&["--max-image-pixels", "100000", "--max-request-pixels", "30000"]);
    let (status, body, _) = post(&server, &request("What?", &["large.png"]));
    assert_eq!((status, error_code(&body)), (413, "image_too_large"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--max-image-pixels"), "{body}");
    // wide.png (30,000 pixels) fits once, not twice.
    let (status, body, _) = post(&server, &request("What?", &["wide.png"]));
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = post(&server, &request("What?", &["wide.png", "wide.png"]));
    assert_eq!((status, error_code(&body)), (413, "images_too_large"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--max-request-pixels"), "{body}");
    // 4 tiles of 16 tokens each (3 + thumbnail): two images are over a batch of 80 image tokens.
    let server = start(&["--max-batch-image-tokens", "80"]);
    let (status, body, _) = post(&server, &request("What?", &["wide.png", "wide.png"]));
    assert_eq!((status, error_code(&body)), (413, "images_too_large"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--max-batch-image-tokens"), "{body}");
    let (status, body, _) = post(&server, &request("What?", &["wide.png"]));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_wrong_method_gets_an_openai_error_object() {
    let server = start(&[]);
    let response = match ureq::get(&format!("{}/v1/chat/completions", server.url)).call() {
        Err(ureq::Error::Status(_, response)) => response,
        other => panic!("expected an error status, got {other:?}"),
    };
    assert_eq!(response.status(), 405);
    let body: Value = response.into_json().unwrap();
    assert_eq!(error_code(&body), "method_not_allowed");
    assert!(body["error"]["message"].as_str().unwrap().contains("GET"), "{body}");
}

#[test]
fn a_pixtral_checkpoint_is_served_like_the_library() {
    let server = common::start_server("pixtral", MODEL, &[]);
    let (status, body, _) = post(&server, &request("What is in this image?", &["wide.png"]));
    assert_eq!(status, 200, "{body}");
    let vlm = vlm::Vlm::from_dir(&model_dir("pixtral"), &vlm::device::cpu()).unwrap();
    assert_eq!(answer(&body), expected_with(&vlm, "What is in this image?", &["wide.png"]));
}

#[test]
fn a_qwen_vl_checkpoint_is_served_like_the_library() {
    let server = common::start_server("qwen2_5-vl", MODEL, &[]);
    let (status, body, _) = post(&server, &request("What is in this image?", &["wide.png"]));
    assert_eq!(status, 200, "{body}");
    let vlm = vlm::Vlm::from_dir(&model_dir("qwen2_5-vl"), &vlm::device::cpu()).unwrap();
    assert_eq!(answer(&body), expected_with(&vlm, "What is in this image?", &["wide.png"]));
}

#[test]
fn a_nemotron_omni_checkpoint_is_served_like_the_library() {
    let server = common::start_server("nemotron-omni", MODEL, &[]);
    let (status, body, _) = post(&server, &request("What is in this image?", &["nemotron-200x90.png"]));
    assert_eq!(status, 200, "{body}");
    let vlm = vlm::Vlm::from_dir(&model_dir("nemotron-omni"), &vlm::device::cpu()).unwrap();
    assert_eq!(answer(&body), expected_with(&vlm, "What is in this image?", &["nemotron-200x90.png"]));
}
