"""Model directories that carry Python code, against a real worker, for both engines.

Each code file writes a marker file when its top-level code runs. The
markers must never appear unless the worker was started with
``--trust-remote-code`` *and* the ``load`` asked for ``trust_remote_code``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bridge import demo_model
from tests.harness import WorkerProcess

TOKENIZER_CODE = "tokenization_evil"
# each ``auto_map`` a model directory may carry, with the module it names
AUTO_MAPS = {
    "tokenizer_config.json": {"AutoTokenizer": [f"{TOKENIZER_CODE}.EvilTokenizer", None]},
    "config.json": {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
        "AutoProcessor": "processing_evil.EvilProcessor",
    },
    "processor_config.json": {"AutoProcessor": "processing_evil.EvilProcessor"},
    "preprocessor_config.json": {"AutoImageProcessor": "image_processing_evil.EvilImageProcessor"},
}
MODULES = {
    TOKENIZER_CODE: "from transformers import PreTrainedTokenizerFast\n"
    "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n",
    "configuration_evil": "class EvilConfig:\n    pass\n",
    "modeling_evil": "class EvilModel:\n    pass\n",
    "processing_evil": "class EvilProcessor:\n    pass\n",
    "image_processing_evil": "class EvilImageProcessor:\n    pass\n",
    "evil_model": "from mlx_vlm.models.qwen2_vl import *  # noqa\n",
}


def with_code(
    source: Path, target: Path, markers: Path, *, maps: dict[str, Any], model_file: bool = False
) -> Path:
    """A copy of ``source`` whose configs carry ``maps`` (file → auto_map) and,
    with ``model_file``, a ``model_file`` in config.json; every code module
    writes ``markers/<module>`` when imported."""
    shutil.copytree(source, target)
    for name, auto_map in maps.items():
        path = target / name
        config = json.loads(path.read_text()) if path.exists() else {}
        config["auto_map"] = auto_map
        path.write_text(json.dumps(config))
    if model_file:
        config = json.loads((target / "config.json").read_text())
        config["model_file"] = "evil_model.py"
        (target / "config.json").write_text(json.dumps(config))
    for module, body in MODULES.items():
        marker = markers / module
        code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n{body}"
        (target / f"{module}.py").write_text(code)
    return target


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model.ensure(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlx_vlm")
    from bridge.demo import vlm as demo_vlm

    return demo_vlm.ensure(tmp_path_factory.mktemp("models") / "tiny-vlm")


@pytest.fixture(params=["text", "vision"])
def fixture_model(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(f"tiny_{request.param}"))


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    path = tmp_path / "markers"
    path.mkdir()
    return path


def worker(tmp_path: Path, *args: str) -> WorkerProcess:
    # transformers copies trusted code into its modules cache: keep it in the test's folder
    return WorkerProcess("bridge", args, env={"HF_MODULES_CACHE": str(tmp_path / "hf-modules")})


def ran(markers: Path) -> list[str]:
    return sorted(p.name for p in markers.iterdir())


def assert_serving(w: WorkerProcess) -> None:
    assert w.call({"cmd": "ping", "id": "p"})["type"] == "pong"


@pytest.mark.parametrize("flag", [False, True], ids=["no-flag", "flag"])
def test_code_in_a_model_directory_never_runs_unless_the_load_asks(
    fixture_model: Path, tmp_path: Path, markers: Path, flag: bool
) -> None:
    model = with_code(fixture_model, tmp_path / "model", markers, maps=AUTO_MAPS)
    with worker(tmp_path, *(["--trust-remote-code"] if flag else [])) as w:
        plain = w.call({"cmd": "load", "id": "plain", "path": str(model)}, timeout=120)
        assert plain["type"] == "loaded", plain
        assert ran(markers) == []
        off = {"cmd": "load", "id": "off", "path": str(model), "trust_remote_code": False}
        assert w.call(off, timeout=120)["type"] == "loaded"
        assert ran(markers) == []
        # the model answers with its own (non-custom) tokenizer
        tokens = w.call({"cmd": "tokenize", "id": "t", "text": "hello"})
        assert tokens["type"] == "tokens" and tokens["tokens"]
        assert_serving(w)


def test_asking_without_the_flag_is_forbidden_before_anything_is_read(
    fixture_model: Path, tmp_path: Path, markers: Path
) -> None:
    model = with_code(fixture_model, tmp_path / "model", markers, maps=AUTO_MAPS)
    with worker(tmp_path) as w:
        for path in (str(model), str(tmp_path / "no-such-dir")):
            request = {"cmd": "load", "id": "ask", "path": path, "trust_remote_code": True}
            reply = w.call(request, timeout=120)
            assert reply["type"] == "error" and reply["code"] == "forbidden", reply
            assert "trust_remote_code" in reply["error"]
            assert "--trust-remote-code" in reply["error"]
        assert ran(markers) == []
        assert w.call({"cmd": "info", "id": "i"})["code"] == "no_model"
        assert_serving(w)


def test_flag_and_request_together_run_the_tokenizer_code(
    fixture_model: Path, tmp_path: Path, markers: Path
) -> None:
    maps = {"tokenizer_config.json": AUTO_MAPS["tokenizer_config.json"]}
    model = with_code(fixture_model, tmp_path / "model", markers, maps=maps)
    with worker(tmp_path, "--trust-remote-code") as w:
        assert (
            w.call({"cmd": "load", "id": "plain", "path": str(model)}, timeout=120)["type"]
            == "loaded"
        )
        assert ran(markers) == []
        request = {"cmd": "load", "id": "trusted", "path": str(model), "trust_remote_code": True}
        reply = w.call(request, timeout=120)
        assert reply["type"] == "loaded", reply
        assert ran(markers) == [TOKENIZER_CODE]
        assert_serving(w)


def test_a_compiled_model_file_that_hides_its_source_is_refused(
    fixture_model: Path, tmp_path: Path, markers: Path
) -> None:
    """A ``.pyc`` can name any file as its source (here ``<frozen …>``, which
    looks like code made in memory): the guard refuses opening it."""
    import py_compile

    model = with_code(fixture_model, tmp_path / "model", markers, maps={}, model_file=True)
    py_compile.compile(
        str(model / "evil_model.py"), cfile=str(model / "arch.pyc"), dfile="<frozen qwen2_vl>"
    )
    config = json.loads((model / "config.json").read_text())
    config["model_file"] = "arch.pyc"
    (model / "config.json").write_text(json.dumps(config))
    with worker(tmp_path) as w:
        reply = w.call({"cmd": "load", "id": "plain", "path": str(model)}, timeout=120)
        assert ran(markers) == []
        assert reply["type"] == "error" and reply["code"] == "load_failed", reply
        assert_serving(w)


def test_a_model_file_in_config_json_is_refused_without_trust(
    fixture_model: Path, tmp_path: Path, markers: Path
) -> None:
    """mlx-lm refuses ``model_file`` itself; mlx-vlm imports it unconditionally,
    which the worker's guard stops."""
    model = with_code(fixture_model, tmp_path / "model", markers, maps={}, model_file=True)
    with worker(tmp_path, "--trust-remote-code") as w:
        reply = w.call({"cmd": "load", "id": "plain", "path": str(model)}, timeout=120)
        assert reply["type"] == "error" and reply["code"] == "load_failed", reply
        assert "evil_model" in reply["error"]  # its source, or its cached .pyc
        assert ran(markers) == []
        assert_serving(w)


# -- the guard itself, in process ------------------------------------------------------------


def test_the_guard_refuses_code_and_pickles_even_when_swallowed(tmp_path: Path) -> None:
    import pickle
    import runpy
    import threading
    from collections import OrderedDict

    from bridge.model_dir.remote_code import CodeGuard
    from protocol.errors import LoadFailed

    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "ran"
    (model / "code.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    outside = tmp_path / "elsewhere.py"
    outside.write_text(f"open({str(marker)!r}, 'w').close()\n")
    attempts: list[Any] = [
        lambda: runpy.run_path(str(model / "code.py")),
        lambda: runpy.run_path(str(outside)),  # not installed code: refused on the loading thread
        lambda: pickle.loads(pickle.dumps(OrderedDict(a=1))),
    ]
    for attempt in attempts:
        with pytest.raises(LoadFailed, match="trust_remote_code"):
            with CodeGuard(model, allowed=False, request_id="x"):
                try:
                    attempt()
                except BaseException:  # as a library that swallows everything would
                    pass
        assert not marker.exists()

    def other_thread() -> None:
        try:
            runpy.run_path(str(model / "code.py"))
        except BaseException:
            pass

    with pytest.raises(LoadFailed, match="code.py"):
        with CodeGuard(model, allowed=False, request_id="x"):
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
    assert not marker.exists()
    # installed code, code made in memory and allowed loads are untouched
    with CodeGuard(model, allowed=False, request_id="x"):
        import json.tool  # noqa: F401

        exec(compile("y = 1", "<string>", "exec"), {})
    with CodeGuard(model, allowed=True, request_id="x"):
        runpy.run_path(str(model / "code.py"))
    assert marker.exists()
    runpy.run_path(str(outside))  # and nothing is refused once the guard is left
