"""`kvshelf status` as a person reads it: every column of the segment and
client tables lines up under its header, whatever the length of the ids,
names and addresses in it (issue 13 item 7)."""
import re


def tables(text):
    """{'segments': [header, rows...], 'clients': [...]} from the text output."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^(segments|clients) \(\d+\)$", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        if cur is not None and line.startswith("  ") and line.strip():
            cur.append(line)
        elif not line.strip():
            cur = None
    return out


def columns(header):
    """(start, end) of each header word group (names may hold one space)."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+(?: \S+)?", header)]


def check_aligned(name, lines, right):
    header, rows = lines[0], lines[1:]
    cols = columns(header)
    assert rows, "%s: no rows" % name
    for row in rows:
        for i, (s, e) in enumerate(cols):
            if i in right:  # numbers end where the header ends
                assert e <= len(row) and row[e - 1] != " " and (e == len(row) or row[e] == " "), \
                    "%s: column %s not right-aligned in\n%s\n%s" % (name, header[s:e], header, row)
            else:  # text starts where the header starts
                assert row[s] != " " and (s == 0 or row[s - 1] == " "), \
                    "%s: column %s does not start under its header in\n%s\n%s" % (
                        name, header[s:e], header, row)


def test_status_columns_line_up(kv):
    m = kv.start_master()
    kv.start_node(m, segment_size="32M", name="node-with-a-long-name")
    kv.start_node(m, segment_size="16M")
    r = kv.bench(m, "--mode", "put,get", "--sizes", "4K", "--count", 20, "--keep")
    assert r["fatal"] == 0
    args = ["status", "--master", m.addr] + (["--secret", m.secret] if m.secret else [])
    p = kv.run(*args)
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode() if isinstance(p.stdout, bytes) else p.stdout
    t = tables(out)
    assert "segments" in t and len(t["segments"]) == 3, out
    assert "clients" in t and len(t["clients"]) >= 3, out
    # ids are large random numbers: wider than the old fixed columns
    assert max(len(r.split()[0]) for r in t["segments"][1:]) > 5
    check_aligned("segments", t["segments"], right={0, 3, 4})
    check_aligned("clients", t["clients"], right={0, 3})
