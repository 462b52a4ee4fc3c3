"""`tokenmill serve --model-repository DIR`: the folders and their tokenmill.toml files, read and
checked (each mistake named by file and field), and a real server over a directory holding the
default LLM and minilm, one loaded at start and one loaded later through /v2/repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.process import ServeProcess
from tokenmill.cli import build_parser, main, serve_entries
from tokenmill.server.repository_dir import RepositoryConfigError, read_repository


def write(root: Path, name: str, text: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenmill.toml").write_text(text)
    return folder / "tokenmill.toml"


def test_reads_every_folder_with_its_settings(tmp_path):
    write(tmp_path, "chat", 'kind = "generate"\nmodel = "smollm2"\n[engine]\nmax_num_seqs = 4\ndtype = "float32"\n')
    write(tmp_path, "minilm", 'kind = "embedding"\nmodel = "minilm"\nload = false\n[engine]\nmax_batch_inputs = 32\n'
                              'dtype = "float32"\n')
    (tmp_path / ".hidden").mkdir()  # not a model
    (tmp_path / "README").write_text("loose files are not models")
    chat, minilm = read_repository(tmp_path)
    assert (chat.name, chat.kind, chat.model, chat.load_at_start) == ("chat", "generate", "smollm2", True)
    assert chat.settings == {"max_num_seqs": 4, "dtype": "float32"}
    assert (minilm.name, minilm.kind, minilm.load_at_start, minilm.settings) == \
        ("minilm", "embedding", False, {"max_batch_inputs": 32, "dtype": "float32"})


def test_a_model_path_is_relative_to_its_folder(tmp_path):
    write(tmp_path, "local", 'kind = "generate"\nmodel = "weights.gguf"\n')
    (tmp_path / "local" / "weights.gguf").write_bytes(b"")
    (entry,) = read_repository(tmp_path)
    assert entry.model == str(tmp_path / "local" / "weights.gguf")


@pytest.mark.parametrize("text, words", [
    ('model = "smollm2"\n', ["field 'kind' is missing"]),
    ('kind = "chat"\nmodel = "smollm2"\n', ["field 'kind'", "'chat'", "generate, embedding"]),
    ('kind = "generate"\n', ["field 'model' is missing"]),
    ('kind = "generate"\nmodel = 3\n', ["field 'model' must be a str"]),
    ('kind = "generate"\nmodel = "smollm2"\nload = "yes"\n', ["field 'load' must be true or false"]),
    ('kind = "generate"\nmodel = "smollm2"\nthreads = 2\n', ["unknown field 'threads'"]),
    ('kind = "generate"\nmodel = "smollm2"\n[engine]\nmax_seqs = 4\n', ["[engine] unknown setting 'max_seqs'"]),
    ('kind = "generate"\nmodel = "smollm2"\n[engine]\nmax_num_seqs = "4"\n', ["[engine] max_num_seqs must be a int"]),
    ('kind = "generate"\nmodel = "smollm2"\n[engine]\nmax_num_seqs = 0\n', ["[engine]", "max_num_seqs"]),
    ('kind = "generate"\nmodel = "smollm2"\n[engine]\ndtype = "float8"\n', ["[engine]", "dtype"]),
    ('kind = "embedding"\nmodel = "minilm"\n[engine]\nmax_num_seqs = 4\n',
     ["'max_num_seqs' is not a setting of an embedding model"]),
    ('kind = "embedding"\nmodel = "minilm"\n[engine]\ndtype = "float16"\n',
     ["dtype of an embedding model is one of auto, float32, bfloat16", "'float16'"]),
    ('kind = "generate"\nmodel = "smollm2"\nengine = 4\n', ["'engine' must be a table"]),
    ('kind = "generate"\nmodel = "smollm2\n', ["not valid TOML"]),
])
def test_mistakes_name_the_file_and_the_field(tmp_path, text, words):
    path = write(tmp_path, "m", text)
    with pytest.raises(RepositoryConfigError) as e:
        read_repository(tmp_path)
    message = str(e.value)
    assert message.startswith(str(path)), message
    for w in words:
        assert w in message, message


def test_directory_mistakes(tmp_path):
    with pytest.raises(RepositoryConfigError, match="not a directory"):
        read_repository(tmp_path / "nope")
    with pytest.raises(RepositoryConfigError, match="no model folders"):
        read_repository(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryConfigError, match=r"empty: no tokenmill.toml"):
        read_repository(tmp_path)


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_serve_entries_join_flags_and_the_repository(tmp_path):
    write(tmp_path, "minilm", 'kind = "embedding"\nmodel = "minilm"\n')
    alone = serve_entries(serve_args("--model-repository", str(tmp_path)))
    assert [e.name for e in alone] == ["minilm"]  # no default smollm2 beside a repository
    both = serve_entries(serve_args("--model", "chat=smollm2", "--model-repository", str(tmp_path)))
    assert [(e.name, e.kind) for e in both] == [("chat", "generate"), ("minilm", "embedding")]
    with pytest.raises(ValueError, match="unique"):
        serve_entries(serve_args("--model", "minilm=smollm2", "--model-repository", str(tmp_path)))
    write(tmp_path, "wrong", 'kind = "embedding"\nmodel = "smollm2"\n')
    with pytest.raises(ValueError, match=r"wrong/tokenmill.toml: field 'kind' is 'embedding', but 'smollm2' is a generative"):
        serve_entries(serve_args("--model-repository", str(tmp_path)))


def test_serve_refuses_a_bad_repository_before_opening_the_port(tmp_path, capsys):
    write(tmp_path, "m", 'kind = "generate"\nmodel = "smollm2"\n[engine]\nmax_num_seqs = -1\n')
    assert main(["serve", "--model-repository", str(tmp_path), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "m/tokenmill.toml: [engine]" in err and "max_num_seqs" in err, err


@pytest.mark.slow
def test_serve_a_repository_directory(tmp_path):
    write(tmp_path, "chat", 'kind = "generate"\nmodel = "smollm2"\n[engine]\nmax_num_seqs = 2\nmax_model_len = 512\n')
    write(tmp_path, "minilm", 'kind = "embedding"\nmodel = "minilm"\nload = false\n[engine]\nmax_batch_inputs = 8\n')
    server = ServeProcess("--model-repository", str(tmp_path), startup_timeout=180)
    import httpx

    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            index = {m["name"]: m for m in http.get("/v2/repository/index").json()}
            assert {n: (m["state"], m["kind"]) for n, m in index.items()} == \
                {"chat": ("ready", "generate"), "minilm": ("unavailable", "embedding")}
            assert "load = false" in index["minilm"]["reason"]
            r = http.post("/v1/embeddings", json={"model": "minilm", "input": "x"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = http.post("/v2/repository/models/minilm/load")
            assert r.status_code == 200 and r.json()["state"] == "ready", r.text
            r = http.post("/v1/embeddings", json={"model": "minilm", "input": ["a cat", "a dog"]})
            assert r.status_code == 200 and [len(d["embedding"]) for d in r.json()["data"]] == [384, 384]
            r = http.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            assert {m["id"]: m.get("kind") for m in http.get("/v1/models").json()["data"]} == \
                {"chat": "generate", "minilm": "embedding"}
    finally:
        assert server.terminate() == 0
