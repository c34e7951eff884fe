"""Secrets taken out of free text before anyone is shown it: query statistics, error messages agents stored.

Agents store what their tools printed, so the forms covered are the ones tools print: environment dumps
(`PGPASSWORD=x`, `POSTGRES_PASSWORD='x'`, `GITHUB_TOKEN=x`), YAML (`password: x`, block scalars too), JSON,
Python and Ruby literals (`{"password": "x"}`, `:password => 'x'`), INI and connection strings (`Pwd=x;`), libpq
strings (`password=x`), SQL (`PASSWORD 'x'`, `IDENTIFIED BY 'x'`), XML (`<password>x</password>`), command lines
(`--password x`, `curl -u user:x`, `mysql -px`, `sshpass -p x`), `.netrc`, URLs with a password or with a token
in place of the user (plain or percent-encoded), HTTP authorisation and cookie headers, PEM private keys, and the
tokens of the services agents work with, wherever they appear.

Every pattern runs in time linear in the text: none starts an unbounded scan at each position of a long run.
"""

from __future__ import annotations

import re

MASK = "***"
# Text without any of these has no named secret to look for (a quick test before the slower patterns).
_STEMS = re.compile(r"(?i)pass|pwd|secret|token|cred|auth|sig|key|cookie|bearer|login|-p|-u|--user")

# A name that holds a secret ends with one of these words (PGPASSWORD, GITHUB_TOKEN, OPENAI_API_KEY, AccountKey),
# never a plural or a longer word (max_tokens, passwordless, passed); a short tail may follow (_FILE).
_KEYWORD = (
    r"(?:password|passwd|passphrase|pass|pwd|secret|token|credentials?|auth|sig|signature"
    r"|(?:account|access|secret|private|master|shared[_\-]?access|api|client|auth|signing|encryption)[_\-]?key)"
    r"(?![a-z])[\w\-]{0,40}"
)
_QUOTED = r"""'(?:[^'\\\n]|''|\\.){0,4096}'|"(?:[^"\\\n]|\\.){0,4096}\""""
# `name=value`, `name = 'value'`, `name => 'value'`, `b'value'`: the value, quoted or up to a space or separator.
_ASSIGNED = re.compile(
    rf"""(?P<name>{_KEYWORD}["']?[ \t]{{0,8}}(?:=>|=|%3D)[ \t]{{0,8}}b?)"""
    rf"""(?P<value>{_QUOTED}|['"][^\n]*|[^\s&;,)}}\]'"]+)""",
    re.IGNORECASE,
)
# `name: value` (YAML, a log line), `"name": "value"` (JSON): a quoted value, or an unquoted one to the end of its
# line (YAML's plain scalars may hold spaces).
_LABELLED = re.compile(
    rf"""(?P<name>{_KEYWORD}["']?[ \t]{{0,8}}:(?!//)[ \t]{{0,8}}b?)(?P<value>{_QUOTED}|['"][^\n]*|[^\s'"][^\n]*)""",
    re.IGNORECASE,
)
# A command line's flag: `--password x`, `--api-key=x`, `-p x` of sshpass, `mysql -px`, `curl -u user:x`.
_FLAG = re.compile(
    rf"""(?P<name>(?<![\w\-])--?[\w\-]{{0,20}}?{_KEYWORD}(?:[ \t]+|=))(?P<value>{_QUOTED}|[^\s'"]+)"""
    r"""|(?P<name2>\bsshpass[ \t]+-p[ \t]*)(?P<value2>\S+)"""
    r"""|(?P<name3>\bmysql(?:dump|admin)?\b[^\n]{0,200}?[ \t]-p)(?P<value3>[^\s-]\S*)"""
    r"""|(?P<name4>(?<![\w\-])(?:-u|--user)[ \t]+[^\s:]{1,200}:)(?P<value4>\S+)""",
    re.IGNORECASE,
)
# `.netrc`: `machine h login u password x`, on one line or several.
_NETRC = re.compile(r"(?im)(\blogin[ \t]+\S+[ \t]+password[ \t]+|^[ \t]*password[ \t]+)(?=\S+[ \t]*$)\S+")
# `PASSWORD '...'` (CREATE/ALTER ROLE, dblink and FDW options), `IDENTIFIED BY '...'`: the literal after it.
_SQL_LITERAL = re.compile(
    r"""(\b(?:password|identified[ \t]+by)[ \t]+)(E?'(?:[^'\\]|''|\\.){0,4096}'|\$(\w{0,20})\$.{0,4096}?\$\3\$)""",
    re.IGNORECASE | re.DOTALL,
)
# `<password>x</password>` (Maven), `<add key="Password" value="x"/>` (NuGet, .NET settings).
_XML = re.compile(rf"(?i)(<(?P<tag>[\w\-]{{0,30}}?{_KEYWORD})>)[^<]{{0,4096}}(</(?P=tag)>)")
_XML_SETTING = re.compile(
    rf"""(?i)(\bkey[ \t]*=[ \t]*["'][\w.\-]{{0,40}}?{_KEYWORD}["'][ \t]+value[ \t]*=[ \t]*)({_QUOTED})"""
)
# `Authorization: Bearer x`, `Proxy-Authorization: Basic x`, `Cookie: a=b`, and a bearer credential elsewhere.
_HEADER = re.compile(
    r"(?P<name>\b(?:proxy-)?authorization[ \t]*[:=][ \t]*(?:[a-z]+[ \t]+)?|\b(?:set-)?cookie[ \t]*:[ \t]*)"
    r"(?P<value>[^\n'\"]+)"
    r"|(?P<name2>\bbearer[ \t]+)(?P<value2>(?=[\w.~+/\-]{0,200}\d)[\w.~+/\-]+=*)",
    re.IGNORECASE,
)
# Tokens that say what they are: GitHub, GitLab, OpenAI-style, Slack, Google, npm, PyPI; an AWS secret key
# printed after its key id.
_KNOWN_TOKEN = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|glpat-[\w\-]{20,}|sk-[\w\-]{20,}|xox[abposr]-[\w\-]{10,}"
    r"|AIza[\w\-]{30,}|ya29\.[\w\-]{20,}|npm_[A-Za-z0-9]{30,}|pypi-[\w\-]{40,})"
)
_AWS_SECRET = re.compile(r"(\bAKIA[0-9A-Z]{16}[\s:,;=]{1,8})[A-Za-z0-9/+]{40}\b")
_PEM = re.compile(r"-----BEGIN ([A-Z ]{0,40}PRIVATE KEY)-----")
# A percent-encoded URL with a password: `https%3A%2F%2Fuser%3Apw%40host`.
_ENCODED_USERINFO = re.compile(r"(?i)(%3A%2F%2F[^%\s/@]{0,200}%3A)[^\s/@]{1,256}?(%40)")
# Where a URL's user alone is a secret: git over HTTPS takes a token as the user.
_TOKEN_AS_USER_SCHEMES = frozenset({"http", "https", "git+https", "ws", "wss"})
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]{0,30}$", re.IGNORECASE)
_AUTHORITY_END = re.compile(r"[\s/'\"]")
_ADDRESS_END = re.compile(r"[\s'\"]")
_LONGEST_USERINFO = 128
# YAML: a secret's value on the lines after its key (`password: |`, `password: >-`, `password:`).
_YAML_BLOCK_KEY = re.compile(
    rf"""(?im)^([ \t]*)["']?[\w.\-]{{0,40}}{_KEYWORD}["']?[ \t]*:[ \t]*([|>][-+0-9]*)?[ \t]*$"""
)


def redact_secrets(text: str) -> str:
    """`text` with every secret in a form above replaced by `***`."""
    text = _mask_pem(text)
    text = _mask_yaml_blocks(text)
    text = _SQL_LITERAL.sub(lambda match: f"{match.group(1)}'{MASK}'", text)
    text = _mask_urls(text)
    text = _ENCODED_USERINFO.sub(lambda match: f"{match.group(1)}{MASK}{match.group(2)}", text)
    if _STEMS.search(text):
        text = _HEADER.sub(_mask_pair, text)
        text = _FLAG.sub(_mask_pair, text)
        text = _NETRC.sub(lambda match: f"{match.group(1)}{MASK}", text)
        text = _XML.sub(lambda match: f"{match.group(1)}{MASK}{match.group(3)}", text)
        text = _XML_SETTING.sub(lambda match: f"{match.group(1)}{_masked(match.group(2))}", text)
        text = _ASSIGNED.sub(_mask_named_value, text)
        text = _LABELLED.sub(_mask_named_value, text)
    text = _AWS_SECRET.sub(lambda match: f"{match.group(1)}{MASK}", text)
    return _KNOWN_TOKEN.sub(MASK, text)


def _mask_pair(match: re.Match[str]) -> str:
    """The first of the pattern's name/value pairs that matched, its value masked (quotes kept)."""
    for suffix in ("", "2", "3", "4"):
        name = match.groupdict().get(f"name{suffix}")
        if name is not None:
            return f"{name}{_masked(match.group(f'value{suffix}'))}"
    return match.group(0)


def _mask_named_value(match: re.Match[str]) -> str:
    return f"{match.group('name')}{_masked(match.group('value'))}"


def _masked(value: str) -> str:
    if value.strip("'\"") == MASK or value.startswith(f"{MASK}@"):
        return value  # masked already (a URL's user, say)
    quote = value[0] if value[0] in "'\"" else ""
    closed = quote and len(value) > 1 and value[-1] == quote
    return f"{quote}{MASK}{quote if closed else ''}"


def _mask_urls(text: str) -> str:
    """`scheme://user:secret@host` with the secret masked, and `scheme://secret@host` for schemes that take a token
    as the user. A password holding an unencoded `/` or `@` is masked up to the last `@` before the host. Each
    `://` is looked at once, over a bounded stretch after it."""
    pieces: list[str] = []
    done = 0
    start = text.find("://")
    while start != -1:
        begin = start + 3
        stop = _AUTHORITY_END.search(text, begin, begin + _LONGEST_USERINFO)
        segment = text[begin : stop.start() if stop else begin + _LONGEST_USERINFO]
        at = segment.rfind("@")
        if at == -1 and ":" in segment:
            # An unencoded `/` in the password: the last `@` before the next space ends it.
            stretch = _ADDRESS_END.search(text, begin, begin + _LONGEST_USERINFO)
            at = text[begin : stretch.start() if stretch else begin + _LONGEST_USERINFO].rfind("@")
        scheme = _SCHEME.search(text, max(0, start - 31), start) if at > 0 else None
        if scheme is not None:
            userinfo = text[begin : begin + at]
            user, colon, _secret = userinfo.partition(":")
            if colon:
                shown = f"{user}:{MASK}"
            elif scheme.group(0).lower() in _TOKEN_AS_USER_SCHEMES:
                shown = MASK
            else:
                shown = userinfo
            pieces.append(text[done:begin] + shown)
            done = begin + at
        start = text.find("://", max(begin, done))
    pieces.append(text[done:])
    return "".join(pieces)


def _mask_pem(text: str) -> str:
    pieces: list[str] = []
    done = 0
    for match in _PEM.finditer(text):
        if match.start() < done:
            continue
        end_marker = f"-----END {match.group(1)}-----"
        end = text.find(end_marker, match.end())
        if end == -1:
            pieces.append(text[done : match.end()] + MASK)
            done = len(text)
            break
        pieces.append(text[done : match.end()] + MASK)
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


def _mask_yaml_blocks(text: str) -> str:
    """The lines under a YAML key that holds a secret and has no value on its own line."""
    if not _YAML_BLOCK_KEY.search(text):
        return text
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        key = _YAML_BLOCK_KEY.match(lines[index])
        index += 1
        if key is None:
            continue
        indent = len(key.group(1))
        while index < len(lines) and (
            not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
        ):
            if lines[index].strip():
                lines[index] = lines[index][: len(lines[index]) - len(lines[index].lstrip())] + MASK
            index += 1
    return "\n".join(lines)
