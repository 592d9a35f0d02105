"""The multipart parser (uploads.parse_multipart: the `multipart` library's push parser, fed the whole body) against
Starlette's form parser (python-multipart behind a streaming wrapper, what FastAPI uses), on the same bodies: for
every body here both must agree, the same parts or both refusing it; and no mangled body raises anything else.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.http.uploads import MultipartError, TooManyFiles, parse_multipart

B = "b0undary-42"
CT = f"multipart/form-data; boundary={B}"


def part(name: str, data: bytes, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"--{B}\r\nContent-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + data + b"\r\n"


def close() -> bytes:
    return f"--{B}--\r\n".encode()


def starlette_parts(body: bytes, content_type: str, max_files: int = 8) -> list[tuple[str, str | None, bytes]]:
    async def parse() -> list[tuple[str, str | None, bytes]]:
        async def stream():
            yield body

        headers = Headers({"content-type": content_type})
        form = await MultiPartParser(headers, stream(), max_files=max_files, max_fields=16, max_part_size=1024).parse()
        out = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.append((name, value.filename, await value.read()))
            else:
                out.append((name, None, value.encode()))
        await form.close()
        return out

    return asyncio.run(parse())


def ours(body: bytes, content_type: str, max_files: int = 8) -> list[tuple[str, str | None, bytes]]:
    return [(p.name, p.filename, p.data) for p in parse_multipart(body, content_type, max_files=max_files)]


PNG = (Path(__file__).parent / "fixtures" / "mnist_digits" / "t10k-0000.png").read_bytes()  # a real MNIST digit
ACCEPTED = {
    "one file": part("image", PNG, "d.png", "image/png") + close(),
    "file and text fields": part("model", b"mnist-cnn") + part("image", PNG, "7.png") + part("flag", b"true") + close(),
    "several files": b"".join(part("images", PNG, f"{i}.png") for i in range(5)) + close(),
    "empty file name": part("image", PNG, "") + close(),
    "empty file": part("image", b"", "e.png") + close(),
    "an epilogue": part("image", PNG, "d.png") + close() + b"epilogue",
    "data with CRLF and dashes inside": part("image", b"\r\n--not-the-boundary\r\n--" + B.encode()[:-1], "x") + close(),
    "unicode names": part("bild", b"x", "zahl-\u00fc.png".encode().decode("latin-1")) + close(),
    "no trailing CRLF": part("image", PNG, "d.png") + close()[:-2],
    "text field at the size limit": part("model", b"m" * 1024) + close(),
}
REFUSED = {
    "a preamble": b"preamble\r\n" + part("image", PNG, "d.png") + close(),
    "part without a name": f'--{B}\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\nxx\r\n'.encode()
    + close(),
    "text field over the limit": part("model", b"m" * 1025) + close(),
    "too many files": b"".join(part("images", PNG, f"{i}.png") for i in range(9)) + close(),
    "too many fields": b"".join(part(f"f{i}", b"v") for i in range(17)) + close(),
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_the_same_parts_as_starlette(case: str) -> None:
    body = ACCEPTED[case]
    expected = starlette_parts(body, CT)
    assert expected, "the case must hold at least one part"
    assert ours(body, CT) == expected


@pytest.mark.parametrize("case", REFUSED)
def test_refused_where_starlette_refuses(case: str) -> None:
    body = REFUSED[case]
    with pytest.raises(MultiPartException):
        starlette_parts(body, CT)
    with pytest.raises(MultipartError):
        ours(body, CT)


# Starlette hands over what it got of these (a truncated upload); ours says the body is cut short.
CUT_SHORT = {
    "no closing boundary": part("image", PNG, "d.png"),
    "truncated in the headers": f"--{B}\r\nContent-Disposition: form-data; name=".encode(),
    "truncated in the data": (part("image", PNG, "d.png") + close())[:200],
}


@pytest.mark.parametrize("case", CUT_SHORT)
def test_a_body_cut_short_is_refused(case: str) -> None:
    with pytest.raises(MultipartError):
        ours(CUT_SHORT[case], CT)


def test_limits_name_the_problem() -> None:
    many = b"".join(part("images", PNG, f"{i}.png") for i in range(3)) + close()
    with pytest.raises(TooManyFiles, match="Maximum number of files is 2"):
        parse_multipart(many, CT, max_files=2)
    assert len(parse_multipart(many, CT, max_files=3)) == 3  # the limit itself is allowed
    with pytest.raises(MultipartError, match="no boundary"):
        parse_multipart(many, "multipart/form-data", max_files=8)
    with pytest.raises(MultipartError, match="does not start with the boundary"):
        parse_multipart(many, "multipart/form-data; boundary=other", max_files=8)
    quoted = ours(many.replace(B.encode(), b"a b"), 'multipart/form-data; boundary="a b"')
    assert [name for name, _, _ in quoted] == ["images"] * 3


def test_mangled_bodies_are_parsed_or_refused_never_anything_else() -> None:
    rng = random.Random(13)
    seeds = [*ACCEPTED.values(), *REFUSED.values(), *CUT_SHORT.values()]
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(3000):
        body = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(body) + 1)
            kind = rng.random()
            if kind < 0.4 and body:
                body[min(at, len(body) - 1)] = rng.randrange(256)
            elif kind < 0.7:
                body[at:at] = rng.choice([b"\r\n", b"--", B.encode(), b":", b";", b'"', bytes([rng.randrange(256)])])
            else:
                del body[at : at + rng.randint(1, 40)]
        try:
            parse_multipart(bytes(body), CT, max_files=8)
            outcomes["parsed"] += 1
        except MultipartError:
            outcomes["refused"] += 1
    assert outcomes["parsed"] > 100 and outcomes["refused"] > 100, outcomes
