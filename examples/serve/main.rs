//! An OpenAI-compatible server: `POST /v1/chat/completions` (plain and `stream: true`),
//! `GET /v1/models`, `GET /health`. Requests are queued and run in batches on one model thread.
//!
//! cargo run --release --example serve -- --model OpenGVLab/InternVL3-1B-hf --port 8000
//!
//! Binds 127.0.0.1 unless told otherwise; `--api-key` requires `Authorization: Bearer KEY`.

mod images;
mod openai;
mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc::SyncSender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use vlm::processing::{ImageLimits, Message, ProcessOptions};
use vlm::{GenerationConfig, LoadOptions, Vlm};

use crate::images::ImageFetch;
use crate::openai::{ApiError, ChatRequest, ContentPart, MessageContent, Usage};
use crate::worker::{Event, Job, Slot, Stats};

#[derive(Parser)]
#[command(about = "Serve a vision-language model over an OpenAI-compatible HTTP API")]
struct Args {
    /// Hugging Face repository id or local checkpoint directory.
    #[arg(long)]
    model: String,
    /// The model name clients use (`model` in requests); the --model value by default.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to bind. 127.0.0.1 keeps the server private to this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed on startup).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// cpu, cuda, cuda:N (`--features cuda`) or wgpu (`--features wgpu`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Float dtype of weights and compute: f32, f16 (half the memory) or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Quantize the decoder's weights as they load: q8 or q4 (8- or 4-bit blocks; less memory,
    /// faster CPU decode; see the README for the accuracy cost).
    #[arg(long)]
    quantize: Option<vlm::QuantKind>,
    /// Require `Authorization: Bearer KEY` on the API routes.
    #[arg(long)]
    api_key: Option<String>,
    /// Most requests the model runs together.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most requests queued or running; beyond it, 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body, in MiB (413 beyond).
    #[arg(long, default_value_t = 32)]
    max_body_mib: usize,
    /// Largest image (downloaded or decoded from base64), in MiB.
    #[arg(long, default_value_t = 20)]
    max_image_mib: usize,
    /// Most pixels of one image once decoded (413 beyond): a small file can hold a huge image.
    #[arg(long, default_value_t = 33_554_432)]
    max_image_pixels: u64,
    /// Most pixels of all images of one request together, once decoded (413 beyond).
    #[arg(long, default_value_t = 67_108_864)]
    max_request_pixels: u64,
    /// Most image tokens the model runs in one batch; requests wait for the next batch beyond it
    /// (bounds the vision tower's work and memory per batch; an InternVL tile is 256 tokens).
    #[arg(long, default_value_t = 32_768)]
    max_batch_image_tokens: usize,
    /// Most image tokens all queued and running requests hold pixels for (503 with Retry-After
    /// beyond; 131072 InternVL tokens are 512 tiles, 1.2 GB of f32 pixel values).
    #[arg(long, default_value_t = 131_072)]
    max_queued_image_tokens: usize,
    /// Time limit for fetching an http(s) image, in seconds.
    #[arg(long, default_value_t = 10)]
    image_timeout_s: u64,
    /// Most tiles per image (bounds memory and compute per request).
    #[arg(long)]
    max_tiles: Option<usize>,
    /// Default for requests without max_tokens.
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
}

struct AppState {
    vlm: Arc<Vlm>,
    model_name: String,
    api_key: Option<String>,
    jobs: SyncSender<Job>,
    inflight: Arc<AtomicUsize>,
    max_queue: usize,
    queued_image_tokens: Arc<AtomicUsize>,
    max_queued_image_tokens: usize,
    /// Requests whose images are being decoded and tiled at once (each holds up to
    /// --max-request-pixels of decoded images).
    preparing: Arc<tokio::sync::Semaphore>,
    images: ImageFetch,
    max_tiles: Option<usize>,
    max_batch_image_tokens: usize,
    default_max_tokens: usize,
    max_body_bytes: usize,
    next_id: AtomicU64,
    stats: Arc<Stats>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut device = vlm::device::from_name(&args.device)?;
    vlm::device::configure_dtype(&mut device, &args.dtype)?;
    let vlm = Arc::new(Vlm::from_pretrained_with(&args.model, &device, &LoadOptions { quantize: args.quantize })?);
    let stats = Arc::new(Stats::default());
    let limits =
        worker::BatchLimits { max_rows: args.max_batch.max(1), max_image_tokens: args.max_batch_image_tokens.max(1) };
    let jobs = worker::spawn(vlm.clone(), limits, args.max_queue.max(1), stats.clone());
    let state = Arc::new(AppState {
        vlm,
        model_name: args.served_model_name.unwrap_or_else(|| args.model.clone()),
        api_key: args.api_key,
        jobs,
        inflight: Arc::new(AtomicUsize::new(0)),
        max_queue: args.max_queue.max(1),
        queued_image_tokens: Arc::new(AtomicUsize::new(0)),
        max_queued_image_tokens: args.max_queued_image_tokens.max(limits.max_image_tokens),
        preparing: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
        )),
        images: ImageFetch {
            max_bytes: args.max_image_mib << 20,
            timeout: Duration::from_secs(args.image_timeout_s),
            limits: ImageLimits { max_pixels: args.max_image_pixels },
            max_request_pixels: args.max_request_pixels,
        },
        max_tiles: args.max_tiles,
        max_batch_image_tokens: limits.max_image_tokens,
        default_max_tokens: args.default_max_tokens,
        max_body_bytes: args.max_body_mib << 20,
        next_id: AtomicU64::new(0),
        stats,
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "no such route")
        })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            let message = format!("{method} is not allowed on {}", uri.path());
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed", message)
        })
        .with_state(state);
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
    let address: SocketAddr = listener.local_addr()?;
    println!("listening on http://{address}");
    axum::serve(listener, app).with_graceful_shutdown(shutdown()).await?;
    Ok(())
}

async fn shutdown() {
    let _ = tokio::signal::ctrl_c().await;
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key",
        ))
    }
}

/// Liveness plus queue and batching counters (unauthenticated, for load balancers).
async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let stats = &state.stats;
    Json(serde_json::json!({
        "status": "ok",
        "inflight": state.inflight.load(Ordering::Relaxed),
        "completed": stats.completed.load(Ordering::Relaxed),
        "batches": stats.batches.load(Ordering::Relaxed),
        "largest_batch": stats.largest_batch.load(Ordering::Relaxed),
    }))
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(serde_json::json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "vlm"}],
    }))
    .into_response())
}

/// How much of a too-large body is still read (and dropped) before answering 413, and for how long.
const DRAIN_MAX_BYTES: usize = 64 << 20;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(10);

/// Reads a request body of at most `limit` bytes.
///
/// A larger body is still read to its end and dropped (up to [`DRAIN_MAX_BYTES`] more, for at most
/// [`DRAIN_MAX_TIME`]) before the 413 goes out: closing the connection while the client is still
/// sending would reset it, and the client would see a broken pipe instead of the error (nginx calls
/// this a lingering close).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is over the {} MiB limit (--max-body-mib)", limit >> 20),
        )
    };
    let unreadable = |e: axum::Error| ApiError::invalid(format!("could not read the request body: {e}"));
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(unreadable)?;
        if kept.len() + chunk.len() > limit {
            let mut dropped = kept.len() + chunk.len() - limit;
            let deadline = tokio::time::Instant::now() + DRAIN_MAX_TIME;
            while dropped <= DRAIN_MAX_BYTES {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(Ok(chunk))) => dropped += chunk.len(),
                    Ok(Some(Err(_)) | None) | Err(_) => break,
                }
            }
            return Err(too_large());
        }
        kept.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(kept))
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    authorize(&state, &headers)?;
    let body = read_body(body, state.max_body_bytes).await?;
    let request: ChatRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("malformed request: {e}")))?;
    if let Some(model) = request.model.as_deref().filter(|&m| m != state.model_name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("model {model:?} is not served here (this server has {:?})", state.model_name),
        ));
    }
    if request.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    let Some(mut slot) = Slot::acquire(&state.inflight, state.max_queue) else {
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "overloaded",
            "too many requests queued; retry shortly",
        );
        error.retry_after = Some(1);
        return Err(error);
    };

    let config = GenerationConfig {
        max_new_tokens: Some(request.max_completion_tokens.or(request.max_tokens).unwrap_or(state.default_max_tokens)),
        temperature: request.temperature,
        top_p: request.top_p,
        seed: request.seed,
        stop: request.stop.map(|s| s.into_vec()).unwrap_or_default(),
        max_tiles: state.max_tiles,
        ..GenerationConfig::default()
    };
    config.validate()?;
    let stream = request.stream;
    let include_usage = request.stream_options.is_some_and(|o| o.include_usage);

    // Images, tiling and tokenization off the async threads; errors answer before any model work.
    let prepare_state = state.clone();
    let preparing = state.preparing.clone().acquire_owned().await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", e.to_string())
    })?;
    let encoding = tokio::task::spawn_blocking(move || {
        let _preparing = preparing;
        let messages = to_messages(request.messages, &prepare_state.images)?;
        let options = ProcessOptions {
            max_tiles: prepare_state.max_tiles,
            // InternVL-family prompts put images before the question, as the model cards do.
            images_first: true,
            ..ProcessOptions::default()
        };
        prepare_state.vlm.processor().encode(&messages, &options).map_err(ApiError::from)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", e.to_string()))??;
    if encoding.image_tokens() > state.max_batch_image_tokens {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "images_too_large",
            format!(
                "the request's images make {} image tokens, over the {} of one batch (--max-batch-image-tokens; --max-tiles lowers tiles per image)",
                encoding.image_tokens(),
                state.max_batch_image_tokens
            ),
        ));
    }
    if !slot.hold_image_tokens(&state.queued_image_tokens, encoding.image_tokens(), state.max_queued_image_tokens) {
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "overloaded",
            "too many image tokens queued (--max-queued-image-tokens); retry shortly",
        );
        error.retry_after = Some(1);
        return Err(error);
    }

    let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
    let job = Job { encoding, config, events, slot: Some(slot), started };
    state.jobs.try_send(job).map_err(|_| {
        let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "overloaded", "queue full");
        error.retry_after = Some(1);
        error
    })?;

    let id = format!("chatcmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let model = state.model_name.clone();
    if stream {
        Ok(stream_response(receiver, id, created, model, include_usage).into_response())
    } else {
        complete_response(receiver, id, created, model).await
    }
}

/// Converts OpenAI messages (string or parts) to ours, fetching images in order.
fn to_messages(messages: Vec<openai::ChatMessage>, images: &ImageFetch) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    let mut pixel_budget = images.max_request_pixels;
    messages
        .into_iter()
        .map(|m| {
            let mut message = match m.role.as_str() {
                "system" | "developer" => Message::system(),
                "user" => Message::user(),
                "assistant" => Message::assistant(),
                other => return Err(ApiError::invalid(format!("unsupported role {other:?}"))),
            };
            match m.content {
                None => {}
                Some(MessageContent::Text(text)) => message = message.text(text),
                Some(MessageContent::Parts(parts)) => {
                    for part in parts {
                        message = match part {
                            ContentPart::Text { text } => message.text(text),
                            ContentPart::ImageUrl { image_url } => {
                                message.image(images.load(&image_url.url, &mut pixel_budget)?)
                            }
                        };
                    }
                }
            }
            Ok(message)
        })
        .collect()
}

async fn complete_response(
    mut receiver: tokio::sync::mpsc::UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
) -> Result<Response, ApiError> {
    while let Some(event) = receiver.recv().await {
        match event {
            Event::Delta(_) => {}
            Event::Failed(error) => return Err(error.into()),
            Event::Done(out) => {
                return Ok(Json(serde_json::json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": out.text},
                        "finish_reason": out.stop_reason.finish_reason(),
                    }],
                    "usage": Usage::new(out.prompt_tokens, out.token_ids.len()),
                }))
                .into_response());
            }
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", "the model thread stopped"))
}

fn stream_response(
    mut receiver: tokio::sync::mpsc::UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
) -> Sse<impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>>> {
    let chunk = move |delta: serde_json::Value, finish: Option<&str>, usage: Option<Usage>| {
        let mut value = serde_json::json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if let Some(usage) = usage {
            value["choices"] = serde_json::json!([]);
            value["usage"] = serde_json::to_value(usage).unwrap_or_default();
        }
        SseEvent::default().data(value.to_string())
    };
    let (sse, sse_receiver) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    let _ = sse.send(Ok(chunk(serde_json::json!({"role": "assistant", "content": ""}), None, None)));
    // Forward the model's events as chunks; when the client goes away the SSE receiver is dropped,
    // this task ends and drops `receiver`, which the model thread sees as a cancellation.
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = sse.closed() => return,
                event = receiver.recv() => match event { Some(event) => event, None => return },
            };
            let (chunks, done) = match event {
                Event::Delta(text) => (vec![chunk(serde_json::json!({"content": text}), None, None)], false),
                Event::Failed(error) => {
                    (vec![SseEvent::default().data(ApiError::from(error).body().to_string())], true)
                }
                Event::Done(out) => {
                    let mut chunks = vec![chunk(serde_json::json!({}), Some(out.stop_reason.finish_reason()), None)];
                    if include_usage {
                        let usage = Usage::new(out.prompt_tokens, out.token_ids.len());
                        chunks.push(chunk(serde_json::json!({}), None, Some(usage)));
                    }
                    (chunks, true)
                }
            };
            for chunk in chunks {
                if sse.send(Ok(chunk)).is_err() {
                    return;
                }
            }
            if done {
                let _ = sse.send(Ok(SseEvent::default().data("[DONE]")));
                return;
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(sse_receiver)).keep_alive(KeepAlive::default())
}
