"""The Docker image's entrypoint, run as the image would run it (no Docker daemon is needed): the Dockerfile's
ENV and CMD, in a working folder holding what it COPYs, with MODEL_PATH and MAX_TOKENS given as `docker run -e`
would; only the address differs (127.0.0.1 and a free port instead of 0.0.0.0:8080, as `-p` maps it). Also the
Dockerfile's promises: CPU base image, non-root user, EXPOSE 8080, HEALTHCHECK on /health, Numba cache warmed."""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from live_server import wait_healthy
from oracle import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions():
    """[(INSTRUCTION, argument text)] of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def image():
    env, workdir, copies, cmd, health, user, expose = {}, None, [], None, None, None, []
    for op, arg in instructions():
        if op == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(arg)))
        elif op == "WORKDIR":
            workdir = arg
        elif op == "COPY":
            copies.append(shlex.split(arg)[:-1])
        elif op == "CMD":
            cmd = json.loads(arg)
        elif op == "HEALTHCHECK":
            health = json.loads(arg[arg.index("CMD") + 3:])
        elif op == "USER":
            user = arg
        elif op == "EXPOSE":
            expose.append(arg)
    return dict(env=env, workdir=workdir, copies=copies, cmd=cmd, health=health, user=user, expose=expose,
                base=next(arg for op, arg in instructions() if op == "FROM"))


def test_dockerfile_promises():
    img = image()
    assert img["base"].startswith("python:3.11-slim")
    assert img["user"] not in (None, "0", "root") and img["expose"] == ["8080"]
    assert img["cmd"] == ["tinyhun", "serve", "--host", "0.0.0.0"]
    assert {"MODEL_PATH", "MAX_TOKENS", "TINYHUN_HOME"} <= set(img["env"])
    assert "/health" in " ".join(img["health"])
    warm = [arg for op, arg in instructions() if op == "RUN" and "tinyhun generate" in arg]
    assert warm, "the image warms the Numba cache at build time"


def test_dockerfile_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    r = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_dir(tmp_path):
    """The image's working folder: what the Dockerfile COPYs, at the paths it copies them to."""
    app = tmp_path / "app"
    app.mkdir()
    for sources in image()["copies"]:
        for src in sources:
            dst = app / src
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, dst)
    return app


def _env(img, tmp_path, **run_e):
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "NUMBA_CACHE_DIR", "LANG", "HOME")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"   # the installed `tinyhun`
    env.update(img["env"])
    env["TINYHUN_HOME"] = str(tmp_path / "home")   # the image's home folder, here a temporary one
    env.update(run_e)
    return env


@pytest.mark.slow
def test_the_image_command_serves(app_dir, tmp_path):
    img = image()
    port = _free_port()
    env = _env(img, tmp_path, MODEL_PATH="weights/tiny-hunyuan", MAX_TOKENS="32")
    cmd = img["cmd"] + ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 600)
        check = [c.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for c in img["health"]]
        assert subprocess.run(check, env=env, timeout=30).returncode == 0
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == "tiny-hunyuan"
        r = client.chat.completions.create(model="tiny-hunyuan", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8)
        assert r.usage.completion_tokens <= 8
        with pytest.raises(openai.BadRequestError, match="limit of 32 .MAX_TOKENS."):
            client.chat.completions.create(model="tiny-hunyuan", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=33)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    # docker stop's SIGTERM: a graceful shutdown, then the signal's own exit status (128 + 15)
    assert proc.returncode in (0, 128 + signal.SIGTERM) and "Application shutdown complete" in out, out


@pytest.mark.parametrize("env, message", [
    (dict(MODEL_PATH="/no/such/model"), "MODEL_PATH /no/such/model: no such model folder"),
    (dict(MODEL_PATH="weights/tiny-hunyuan", MAX_TOKENS="lots"), "$MAX_TOKENS='lots': expected a positive integer"),
])
def test_bad_configuration_exits_2_with_one_line(app_dir, tmp_path, env, message):
    img = image()
    r = subprocess.run(img["cmd"] + ["--port", str(_free_port())], cwd=app_dir, env=_env(img, tmp_path, **env),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"tinyhun: error: {message}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _as_a_stranger(path):
    """Make `path` unreadable to the processes the returned command prefix starts, as a file of another user at
    mode 0600 is to the image's user: as root, the file goes to uid 12345 and the process loses the capabilities
    that let root read anything; otherwise the file gets mode 0 (which its owner cannot read either)."""
    if os.geteuid() != 0:
        path.chmod(0)
        return [], f"uid {os.geteuid()}", "0000"
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): no way to be refused a file")
    os.chown(path, 12345, 12345)
    path.chmod(0o600)
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"], "uid 12345", "0600"


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_an_unreadable_model_file_is_named_with_its_owner_and_mode(app_dir, tmp_path, name):
    """The `docker run -v /srv/models:/models:ro` path with a folder prepared by another user: /health (and the
    log) name the file, its owner and mode, instead of a bare 'Permission denied'."""
    img = image()
    model = tmp_path / "models" / "m"
    shutil.copytree(ROOT / "weights" / "tiny-hunyuan", model)
    prefix, owner, mode = _as_a_stranger(model / name)
    port = _free_port()
    proc = subprocess.Popen(prefix + img["cmd"] + ["--host", "127.0.0.1", "--port", str(port)], cwd=app_dir,
                            env=_env(img, tmp_path, MODEL_PATH=str(model)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/health"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(url, timeout=5)
                if r.json().get("status") == "error":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "no load error reported"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    message = r.json()["message"]
    assert r.status_code == 503 and message.startswith(f"{model / name}: cannot be read (permission denied: "
                                                       f"owner {owner}"), message
    assert f"mode {mode}" in message and message in out
