"""``export --to ollama``: the GGUF file and a ``Modelfile`` beside it.

The Modelfile (syntax of Ollama's docs/modelfile.md and docs/template.md as on its main branch,
commit 03127ff; the ``.Messages`` / ``$last`` form of Ollama's own library templates) holds
``FROM ./<file>.gguf``, a Go ``TEMPLATE`` built from the run's Jinja chat template, the
template's default system prompt as ``SYSTEM``, and ``PARAMETER stop`` for the end-of-turn and
eos tokens. Ollama does not run Jinja, so the template is translated: the Jinja template is
rendered with marker texts to find, per role, the text before a message's content and the text
after it (up to and including the end-of-turn token and the whitespace after it), and the text
that opens the assistant's answer. The Go template puts those around ``.System`` and each of
``.Messages`` and opens the answer after the last message. Before anything is written the
translation is checked: rendered the way the Go template renders (``render_like_go``), several
conversations (with and without a system prompt, one and two turns) must give the Jinja
template's text byte for byte; a template that does not (one that numbers turns, or rewrites
earlier ones) is refused with ``--to gguf`` as the way out.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError
from leantune.export.common import Request, end_of_turn, merged_model, write_folder
from leantune.export.gguf_file import check_gguf_run, gguf_name, source_pre, write_model_file

MARK = {"system": "SYSTEM-7f3a", "user": "USER-7f3a", "assistant": "ASSISTANT-7f3a"}


@dataclass(frozen=True)
class Pieces:
    """The text around each role's content, the answer's opening, the default system prompt."""

    before: dict[str, str]
    after: str
    answer: str
    default_system: str | None


def _render(tok: Any, messages: list[dict[str, str]], prompt: bool) -> str:
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt))


def _split_after(gap: str, eot: str) -> str:
    """The end of a message: through the end-of-turn text and the whitespace after it."""
    at = gap.find(eot) if eot else -1
    if at < 0:
        raise LeantuneError(
            "the chat template's end-of-turn text was not found between messages, so it cannot "
            "be written as an Ollama TEMPLATE; use --to gguf"
        )
    end = at + len(eot)
    while end < len(gap) and gap[end] in " \n":
        end += 1
    return gap[:end]


def template_pieces(tok: Any) -> Pieces:
    """Find the pieces (module doc) by rendering marker conversations."""
    refuse = LeantuneError(
        "the run's chat template is not a per-message template Ollama's TEMPLATE can express; "
        "use --to gguf and write the Modelfile's TEMPLATE by hand"
    )
    eot_id = end_of_turn(tok)
    eot = tok.convert_ids_to_tokens(eot_id) if eot_id is not None else ""
    m = MARK
    conv = [{"role": r, "content": m[r]} for r in ("system", "user", "assistant")]
    text = _render(tok, [*conv, {"role": "user", "content": m["user"] + "2"}], True)
    if any(text.count(v) != 1 for v in (m["system"], m["assistant"])):
        raise refuse
    at = {r: text.index(m[r]) for r in m}
    before_system = text[: at["system"]]
    after = _split_after(text[at["system"] + len(m["system"]) : at["user"]], eot)
    user = text[at["system"] + len(m["system"]) + len(after) : at["user"]]
    gap = text[at["user"] + len(m["user"]) : at["assistant"]]
    if not gap.startswith(after):
        raise refuse
    answer = gap[len(after) :]
    alone = _render(tok, [{"role": "user", "content": m["user"]}], True)
    default = None
    if alone != user + m["user"] + after + answer:
        head = alone[: alone.find(m["user"]) - len(user)]
        if not (head.startswith(before_system) and head.endswith(after)):
            raise refuse
        default = head[len(before_system) : len(head) - len(after)]
    pieces = Pieces(
        {"system": before_system, "user": user, "assistant": answer}, after, answer, default
    )
    check_pieces(tok, pieces, refuse)
    return pieces


def render_like_go(pieces: Pieces, messages: list[dict[str, str]]) -> str:
    """What the Go TEMPLATE renders for ``messages`` (SYSTEM as Ollama's default system)."""
    system = next((x["content"] for x in messages if x["role"] == "system"), None)
    system = system if system is not None else pieces.default_system
    out = pieces.before["system"] + system + pieces.after if system else ""
    for x in messages:
        if x["role"] != "system":
            out += pieces.before[x["role"]] + x["content"] + pieces.after
    if messages[-1]["role"] != "assistant":
        out += pieces.answer
    return out


def check_pieces(tok: Any, pieces: Pieces, refuse: LeantuneError) -> None:
    """The translation gives the Jinja template's text on several conversations."""
    u1 = {"role": "user", "content": "What is 2 + 2?"}
    a1 = {"role": "assistant", "content": "4."}
    u2 = {"role": "user", "content": "And 3 + 3?\nBe brief."}
    sys = {"role": "system", "content": "You answer briefly."}
    for conv in ([u1], [sys, u1], [u1, a1, u2], [sys, u1, a1, u2]):
        if render_like_go(pieces, conv) != _render(tok, conv, True):
            raise refuse


def _go(text: str) -> str:
    if "{{" in text or '"""' in text:
        raise LeantuneError("the chat template's text holds '{{' or '\"\"\"'; use --to gguf")
    return text


def modelfile(pieces: Pieces, gguf: str, stops: list[str]) -> str:
    """The Modelfile's text."""
    b = {k: _go(v) for k, v in pieces.before.items()}
    after, answer = _go(pieces.after), _go(pieces.answer)
    # One line, no trim markers: Go's "{{-" would eat the newline that ends a message.
    template = (
        f"{{{{ if .System }}}}{b['system']}{{{{ .System }}}}{after}{{{{ end }}}}"
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f'{{{{ if eq .Role "user" }}}}{b["user"]}{{{{ .Content }}}}{after}'
        f'{{{{ else if eq .Role "assistant" }}}}{b["assistant"]}{{{{ .Content }}}}{after}'
        f'{{{{ end }}}}{{{{ if and $last (ne .Role "assistant") }}}}{answer}{{{{ end }}}}'
        "{{ end }}"
    )
    lines = [f"FROM ./{gguf}", f'TEMPLATE """{template}"""']
    if pieces.default_system:
        lines.append(f'SYSTEM """{_go(pieces.default_system)}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def export_ollama(request: Request) -> tuple[Path, list[str]]:
    """The folder, and the commands that create and run the model in Ollama."""
    check_gguf_run(request)
    model, tok = merged_model(request)
    pieces = template_pieces(tok)
    stops = list(dict.fromkeys(tok.convert_ids_to_tokens(i) for i in _stop_tokens(tok)))
    name, file = request.run.name, gguf_name(request)
    pre = source_pre(request.base)

    def fill(folder: Path) -> None:
        write_model_file(folder / file, model, tok, name, request.quant, pre)
        (folder / "Modelfile").write_text(modelfile(pieces, file, stops), encoding="utf-8")

    folder = write_folder(request, fill)
    where = shlex.quote(str(folder / "Modelfile"))
    return folder, [f"ollama create {name} -f {where}", f"ollama run {name}"]


def _stop_tokens(tok: Any) -> list[int]:
    found = [end_of_turn(tok), tok.eos_token_id]
    return [int(i) for i in found if i is not None]
