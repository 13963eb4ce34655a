"""The SpatialScore service: scores equal in-process scoring (JSON and pickle), every bad input
gets its 4xx and the server keeps serving, dynamic batching packs concurrent requests into the
buckets, the queue bound answers 503, and the client retries across a restart."""

import base64
import http.client
import io
import json
import pickle
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from spatial_jax.configs_lib import load_config
from spatial_jax.data import render, scenes
from spatial_jax.jobs import reward_serve
from spatial_jax.reward import batching, client, protocol, server

TOKEN = "s3cret"


def _images_and_prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  images, prompts = [], []
  for k in range(n):
    scene = scenes.sample_scene(rng)
    images.append(render.render_scene(scene, seed=k))
    prompts.append(scenes.scene_to_prompt(scene, rng))
  return images, prompts


@pytest.fixture(scope="module")
def served():
  """An untrained tiny SpatialScore behind a server on a free loopback port."""
  config = load_config("configs/reward_serve.py", "smoke")
  config.allow_pickle = True
  config.limits.update(max_images=8, max_prompt_chars=1000, max_request_bytes=200_000)
  scorer = reward_serve.load_scorer(config)
  service = reward_serve.make_service(scorer, config)
  srv = server.Server(service, "127.0.0.1", 0)
  srv.start()
  yield scorer, service, srv
  srv.shutdown()
  srv.server_close()


def _post(srv, body, content_type=protocol.JSON_TYPE, headers=None, path="/score"):
  conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
  conn.request("POST", path, body=body, headers={"Content-Type": content_type, **(headers or {})})
  response = conn.getresponse()
  data = response.read()
  conn.close()
  return response.status, data


def _healthy(srv):
  with urllib.request.urlopen(f"{srv.url}/health", timeout=30) as r:
    health = json.loads(r.read())
  assert health["status"] == "ok"
  return health


def test_json_and_pickle_scores_equal_in_process_scoring(served):
  scorer, _, srv = served
  images, prompts = _images_and_prompts(6)
  want_mu, want_sigma = scorer.score(images, prompts)
  status, data = _post(srv, protocol.json_request(images, prompts))
  assert status == 200
  answer = json.loads(data)
  np.testing.assert_allclose(answer["mu"], want_mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(answer["sigma"], want_sigma, rtol=1e-5, atol=1e-6)
  # Flow-GRPO's protocol: pickled JPEG bytes (lossy: scores of the decoded JPEGs), prompts
  # from GenEval-style metadata, posted to the root.
  jpegs = [protocol.encode_image(im, "JPEG") for im in images]
  decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs]
  body = pickle.dumps({"images": jpegs, "meta_datas": [{"prompt": p} for p in prompts]})
  status, data = _post(srv, body, protocol.PICKLE_TYPE, path="/")
  assert status == 200
  answer = pickle.loads(data)
  np.testing.assert_allclose(
    answer["scores"], scorer.score(decoded, prompts)[0], rtol=1e-5, atol=1e-6
  )
  assert answer["scores"] == answer["mu"] and len(answer["sigma"]) == 6
  # The client (numpy / PIL / urllib) gives the same, in requests of at most 4 images.
  remote = client.SpatialScoreClient(srv.url, max_images_per_request=4)
  mu, sigma = remote.score(images, prompts)
  np.testing.assert_allclose(mu, want_mu, rtol=1e-5, atol=1e-6)
  assert remote.health()["max_batch"] == 16


def _png(shape=(32, 32, 3)):
  return base64.b64encode(protocol.encode_image(np.zeros(shape, np.uint8))).decode()


BAD_JSON = [
  ("not json", b"{'images': ", 400, "not valid JSON"),
  ("missing key", json.dumps({"images": [_png()]}).encode(), 400, '"images" and "prompts"'),
  ("not an image", json.dumps({"images": [base64.b64encode(b"hello").decode()], "prompts": ["a"]}).encode(), 400, "images[0] is not a readable PNG or JPEG"),
  ("not base64", json.dumps({"images": ["***"], "prompts": ["a"]}).encode(), 400, "images[0] is not valid base64"),
  ("empty prompt", json.dumps({"images": [_png()], "prompts": ["  "]}).encode(), 400, "prompts[0] is empty"),
  ("mismatched lengths", json.dumps({"images": [_png(), _png()], "prompts": ["a"]}).encode(), 400, "2 images but 1 prompts"),
  ("no images", json.dumps({"images": [], "prompts": []}).encode(), 400, "No images"),
  ("too many images", json.dumps({"images": [_png()] * 9, "prompts": ["a"] * 9}).encode(), 413, "9 images > the limit of 8"),
  ("long prompt", json.dumps({"images": [_png()], "prompts": ["a" * 1001]}).encode(), 413, "1001 characters"),
]  # fmt: skip


@pytest.mark.parametrize("name,body,status,message", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_requests_get_4xx_naming_the_problem_and_the_server_keeps_serving(
  served, name, body, status, message
):
  del name
  _, _, srv = served
  got, data = _post(srv, body)
  assert got == status
  assert message in json.loads(data)["error"]
  _healthy(srv)


def test_truncated_body_wrong_token_pickle_without_the_flag_and_unknown_paths(served):
  _, service, srv = served
  # A body shorter than its Content-Length: the server waits for the rest, then the client
  # gives up (closes): the handler answers what it read and serves the next request.
  sock = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
  sock.putrequest("POST", "/score")
  sock.putheader("Content-Type", protocol.JSON_TYPE)
  sock.putheader("Content-Length", "1000")
  sock.endheaders()
  sock.send(b'{"images": [')
  sock.sock.shutdown(1)  # No more bytes: the read ends short.
  response = sock.getresponse()
  assert response.status == 400 and "truncated" in json.loads(response.read())["error"]
  sock.close()
  _healthy(srv)

  # A body over the limit is refused from its Content-Length, before it is read.
  sock = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
  sock.putrequest("POST", "/score")
  sock.putheader("Content-Length", str(10**9))
  sock.endheaders()
  response = sock.getresponse()
  assert response.status == 413
  assert "1000000000 bytes > the limit of 200000" in json.loads(response.read())["error"]
  sock.close()
  images, prompts = _images_and_prompts(1)
  body = pickle.dumps({"images": [protocol.encode_image(images[0])], "prompts": prompts})
  service.allow_pickle = False
  try:
    status, data = _post(srv, body, protocol.PICKLE_TYPE)
    assert status == 415 and "allow_pickle" in json.loads(data)["error"]
  finally:
    service.allow_pickle = True
  status, data = _post(srv, b"\x80\x04garbage", protocol.PICKLE_TYPE)
  assert status == 400 and "not a pickled dict" in json.loads(data)["error"]
  status, data = _post(srv, protocol.json_request(images, prompts), path="/other")
  assert status == 404

  service.token = TOKEN
  try:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
      status, data = _post(srv, protocol.json_request(images, prompts), headers=headers)
      assert status == 401 and "bearer token" in json.loads(data)["error"]
    status, _ = _post(
      srv, protocol.json_request(images, prompts), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    with pytest.raises(client.RequestRefused, match="401"):
      client.SpatialScoreClient(srv.url).score(images, prompts)
    assert client.SpatialScoreClient(srv.url, token=TOKEN).score(images, prompts)[0].shape == (1,)
  finally:
    service.token = ""
  _healthy(srv)


def test_concurrent_requests_are_packed_into_buckets():
  calls = []

  def score(images, prompts, bucket):
    calls.append((len(images), bucket))
    time.sleep(0.05)  # A scoring call takes a while: requests queue behind it.
    return np.arange(len(images), dtype=np.float32), np.ones(len(images), np.float32)

  batcher = batching.Batcher(score, [4, 16], max_queue=64, max_wait_s=0.02)
  futures = [batcher.submit([i] * 3, [str(i)] * 3) for i in range(12)]
  results = [f.result(timeout=30) for f in futures]
  batcher.close()
  # Each request gets its own rows back, in order.
  starts = [r[0][0] for r in results]
  assert all(
    len(r[0]) == 3 and list(r[0]) == [s, s + 1, s + 2] for r, s in zip(results, starts, strict=True)
  )
  # 12 requests of 3 rows: packed five at a time (15 <= 16), never over the largest bucket,
  # each call at the smallest bucket holding its rows.
  assert sum(n for n, _ in calls) == 36 and len(calls) < 12
  assert all(n <= 16 and bucket == (4 if n <= 4 else 16) for n, bucket in calls)
  assert batcher.stats.requests == 12 and batcher.stats.calls == len(calls)
  assert batcher.bucket_for(40) == 16


def test_a_full_queue_answers_busy_and_a_scoring_error_reaches_each_waiting_request():
  release = threading.Event()

  def slow(images, prompts, bucket):
    release.wait(30)
    if prompts[0] == "fail":
      raise FloatingPointError("non-finite scores")
    return np.zeros(len(images), np.float32), np.zeros(len(images), np.float32)

  batcher = batching.Batcher(slow, [1], max_queue=2, max_wait_s=0.0)
  first = batcher.submit([0], ["fail"])
  time.sleep(0.2)  # The worker holds `first`; the queue is empty again.
  waiting = [batcher.submit([0], ["ok"]) for _ in range(2)]
  with pytest.raises(batching.QueueFull, match="2 requests are queued"):
    batcher.submit([0], ["ok"])
  release.set()
  with pytest.raises(FloatingPointError):
    first.result(timeout=30)
  assert all(f.result(timeout=30)[0].shape == (1,) for f in waiting)
  batcher.close()


def test_client_retries_across_a_restart_and_fails_clearly_when_nothing_answers(served):
  scorer, service, srv = served
  images, prompts = _images_and_prompts(2)
  # A second server on a port that is closed for ~1 s and then opens.
  probe = server.Server(service, "127.0.0.1", 0)
  port = probe.port
  probe.server_close()
  url = f"http://127.0.0.1:{port}"
  later = {}

  def open_later():
    time.sleep(1.0)
    later["server"] = server.Server(service, "127.0.0.1", port)
    later["server"].start()

  threading.Thread(target=open_later).start()
  mu, _ = client.SpatialScoreClient(url, retry_s=30).score(images, prompts)
  np.testing.assert_allclose(mu, scorer.score(images, prompts)[0], rtol=1e-5, atol=1e-6)
  later["server"].shutdown()
  later["server"].server_close()
  with pytest.raises(client.ServiceUnavailable, match="did not answer within 1"):
    client.SpatialScoreClient(url, retry_s=1).score(images, prompts)
  with pytest.raises(ValueError, match="http://"):
    client.SpatialScoreClient("localhost:8123")


def test_flow_grpo_example_scores_torch_style_batches_like_in_process(served):
  import importlib.util

  scorer, _, srv = served
  spec = importlib.util.spec_from_file_location("flow_grpo_reward", "examples/flow_grpo_reward.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  images, prompts = _images_and_prompts(3)
  nchw = (
    np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
  )  # As Flow-GRPO holds them.
  scores, details = example.spatial_score(url=srv.url, batch_size=2)(nchw, prompts, [{}] * 3)
  want_mu, want_sigma = scorer.score(images, prompts)
  np.testing.assert_allclose(scores, want_mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(details["spatial_score_sigma"], want_sigma, rtol=1e-5, atol=1e-6)
