"""The control center in headless Chromium, driven by Playwright.

Run by orchestrator/tests/control_center.rs against a `nexus up` it started (a Modbus
simulator on --sim-port, a devices file with device plc-1, users from NEXUS_UI_ADMIN and
NEXUS_UI_VIEWER as "name:password"). Saves a PNG of every page in --screenshots.
Exits non-zero at the first check that fails, saying which.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from playwright.sync_api import expect, sync_playwright

FIRST_LOAD_BUDGET = 300 * 1024
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


re_rate = re.compile(r"^[0-9.]+/(s|min)$")
re_bad = re.compile(r"^bad ")
re_bad_row = re.compile(r"\bbad\b")
re_count = re.compile(r"^[0-9]+ topics$")


def step(msg):
    print(f"- {msg}", flush=True)


class Shots:
    def __init__(self, page, folder):
        self.page, self.folder, self.n = page, folder, 0

    def __call__(self, name):
        self.n += 1
        path = os.path.join(self.folder, f"{self.n:02d}-{name}.png")
        # From the top: a full-page shot of a scrolled page draws sticky bars mid-page.
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=path, full_page=True)
        step(f"screenshot {path}")


PLC1 = "test/plant/packaging/line-1/plc-1"
PLC2 = "test/plant/packaging/line-2/plc-2"
OFF = "test/plant/packaging/line-9/plc-off"


def quote(topic):
    return urllib.parse.quote(topic, safe="")


def row(page, topic):
    return page.locator(f'#ns-tree .ns-row[data-topic="{topic}"]:not([hidden])')


def namespace(page, app, shot):
    """The namespace tree, live values, search, expand and collapse, and a tag's view."""
    step("the namespace of plc-1, from the overview's link")
    page.locator('#overview-devices tr[data-device="plc-1"] .topics-link').click()
    expect(page).to_have_url(app + "#/namespace?filter=" + quote(PLC1 + "/#"))
    expect(page.locator("#ns-filter")).to_have_value(PLC1 + "/#")
    temperature = row(page, PLC1 + "/temperature")
    expect(temperature).to_be_visible()
    expect(row(page, PLC1 + "/setpoint")).to_be_visible()
    expect(row(page, PLC1 + "/running")).to_be_visible()
    expect(page.locator("#ns-summary")).to_have_attribute("data-topics", "3")
    # Only plc-1's topics: the filter went to the server.
    expect(page.locator('#ns-tree .ns-row[data-topic^="test/plant/packaging/line-9"]')).to_have_count(0)
    expect(temperature.locator(".ns-unit")).to_have_text("degC")
    expect(temperature.locator(".ns-q")).to_have_text("good")
    # The simulator's temperature moves: the row shows new values as they come.
    first = temperature.locator(".ns-value").inner_text()
    expect(temperature.locator(".ns-value")).not_to_have_text(first, timeout=10_000)
    step(f"temperature went from {first} to {temperature.locator('.ns-value').inner_text()}")
    expect(temperature.locator(".ns-rate")).to_have_text(re_rate, timeout=10_000)
    expect(temperature.locator(".ns-age")).not_to_have_text("")
    shot("namespace-device")

    step("the whole namespace: collapse, expand, search")
    page.locator("#nav [data-nav=namespace]").click()
    expect(page).to_have_url(app + "#/namespace")
    expect(page.locator("#ns-filter")).to_have_value("#")
    # Opened down to where the tree branches: the two lines, closed.
    line1 = row(page, "test/plant/packaging/line-1")
    expect(line1).to_have_attribute("aria-expanded", "false")
    expect(line1.locator(".ns-value")).to_have_text("3 topics")
    expect(temperature).to_be_hidden()
    page.locator("#ns-expand").click()
    expect(temperature).to_be_visible()
    # The device that does not answer: its tags are bad and marked so.
    off = row(page, OFF + "/level")
    expect(off).to_be_visible(timeout=30_000)
    expect(off.locator(".ns-q")).to_have_text(re_bad, timeout=30_000)
    expect(off).to_have_class(re_bad_row)
    shot("namespace")
    page.locator("#ns-collapse").click()
    expect(page.locator("#ns-tree .ns-row:not([hidden])")).to_have_count(1)
    top = row(page, "test")
    expect(top).to_have_attribute("aria-expanded", "false")
    expect(top.locator(".ns-value")).to_have_text(re_count)
    shot("namespace-collapsed")
    top.click()
    expect(top).to_have_attribute("aria-expanded", "true")
    expect(row(page, "test/plant")).to_be_visible()
    expect(temperature).to_be_hidden()
    page.locator("#ns-expand").click()
    expect(temperature).to_be_visible()
    row(page, "test/plant").click()
    expect(temperature).to_be_hidden()
    page.locator("#ns-expand").click()
    page.locator("#ns-search").fill("setp")
    setpoint = row(page, PLC1 + "/setpoint")
    expect(setpoint).to_be_visible()
    expect(temperature).to_be_hidden()
    expect(off).to_be_hidden()
    expect(page.locator("#ns-summary")).to_contain_text("1 of ")
    expect(row(page, PLC1).locator(".ns-value")).to_have_text("1 of 3 topics")
    expect(page).to_have_url(app + "#/namespace?search=setp")
    shot("namespace-search")

    step("setpoint's tag view: its live value")
    setpoint.locator(".ns-name").click()
    expect(page).to_have_url(app + "#/tag/" + quote(PLC1 + "/setpoint"))
    expect(page.locator("#tag-unit")).to_have_text("degC")
    expect(page.locator("#tag-quality")).to_have_text("good")
    expect(page.locator("#tag-value")).to_have_text("50")
    expect(page.locator("#tag-live-state")).to_have_text("live")
    expect(page.locator("#tag-count")).not_to_have_text("")
    expect(page.locator('.ranges [data-range="1 h"]')).to_have_attribute("aria-pressed", "true")

    step("temperature's history, as the historian stored it, drawn")
    page.goto(app + "#/tag/" + quote(PLC1 + "/temperature"))
    chart = page.locator("#history-chart")
    # The historian writes within a second or two; the page reads a recent range again
    # every 10 s.
    expect(chart).to_have_attribute("data-points", re.compile(r"^([5-9]|[1-9][0-9]+)$"), timeout=45_000)
    expect(chart).to_have_attribute("data-agg", "raw")
    expect(chart.locator("canvas")).to_have_count(1)
    expect(page.locator("#history-message")).to_be_hidden()
    expect(page.locator("#history-notes")).to_have_text(re.compile(r"^[0-9,]+ points$"))
    step(f"history: {page.locator('#history-notes').inner_text()}")
    shot("tag")

    history_chart(page, shot)

    step("the history's refusals, in words")
    message = page.locator("#history-message")
    page.route("**/api/v1/history?*", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body=json.dumps({"error": "the database is unreachable"})))
    page.locator('.ranges [data-range="15 min"]').click()
    expect(message).to_have_text(
        "The history is unavailable: the database is unreachable. The live value above still updates.")
    expect(chart.locator("canvas")).to_have_count(0)
    shot("tag-history-unavailable")
    page.unroute("**/api/v1/history?*")
    page.goto(app + "#/tag/" + quote(PLC1 + "/nothing"))
    expect(page.locator("#tag-value")).to_have_text("no value")
    expect(message).to_have_text(re.compile(r"^No stored history for this topic \(.+\)\.$"))
    step(f"a topic without points: {message.inner_text()!r}")
    page.locator(".crumbs a", has_text="plc-1").click()
    expect(page.locator("#ns-filter")).to_have_value(PLC1 + "/#")
    expect(row(page, PLC1 + "/setpoint")).to_be_visible()
    page.locator("#nav [data-nav=overview]").click()


def history_answer(url):
    """An answer of GET /api/v1/history as docs/ingestion.md ("History API") describes it:
    200 raw points over the asked range (ten of bad quality, one uncertain) up to 6 hours,
    100 one-minute aggregates beyond."""
    q = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
    lo, hi = int(q["from"][0]), int(q["to"][0])
    assert q["agg"] == ["auto"] and lo < hi, url
    wave = lambda i, n: 50 + 10 * math.sin(i / n * 12)
    if hi - lo <= 6 * 3600 * 1000:
        quality = lambda i: "bad_comm_failure" if 80 <= i < 90 else "uncertain" if i == 120 else "good"
        points = [{"ts": lo + (hi - lo) * i // 200, "v": wave(i, 200), "q": quality(i), "u": "degC"} for i in range(200)]
        agg = "raw"
    else:
        points = [{"ts": lo + (hi - lo) * i // 100, "avg": wave(i, 100), "min": wave(i, 100) - 6,
                   "max": wave(i, 100) + 6, "count": 60, "first": 50.0, "last": 51.0} for i in range(100)]
        agg = "1m"
    return {"topic": q["topic"][0], "agg": agg, "truncated": False, "incomplete": False,
            "incomplete_reasons": [], "points": points}


def history_chart(page, shot):
    """The chart, from answers shaped as the history API's: an hour of points with bad ones
    and a week of aggregates, which the few minutes this test's historian holds cannot give
    (the history API's own answers are tested in data-ingestion/tests): points drawn, bad
    quality marked, a drag zooms in with a new query, aggregates banded."""
    step("the history chart, from answers as the history API gives them")
    asked = []

    def answer(route):
        asked.append(route.request.url)
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps(history_answer(route.request.url)))

    page.route("**/api/v1/history?*", answer)
    try:
        page.locator('.ranges [data-range="1 h"]').click()
        chart = page.locator("#history-chart")
        expect(chart.locator("canvas")).to_have_count(1)
        expect(chart).to_have_attribute("data-points", "200")
        expect(chart).to_have_attribute("data-agg", "raw")
        expect(page.locator("#history-message")).to_be_hidden()
        expect(page.locator("#history-notes")).to_have_text("200 points · 11 of bad or uncertain quality, marked")
        expect(chart.locator(".u-legend")).to_contain_text("bad quality")
        shot("tag-chart")
        before = len(asked)
        box = chart.locator(".u-over").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] / 2, steps=5)
        page.mouse.up()
        expect(page.locator("#history-reset")).to_have_text("Back to 1 h")
        expect(page.locator('.ranges [data-range="1 h"]')).to_have_attribute("aria-pressed", "false")
        assert len(asked) > before, asked
        q = urllib.parse.parse_qs(urllib.parse.urlparse(asked[-1]).query)
        span = int(q["to"][0]) - int(q["from"][0])
        # A quarter of the hour, give or take the plot's edges.
        assert 10 * 60_000 < span < 20 * 60_000, f"zoomed to {span} ms"
        step(f"zoomed to {span / 60_000:.1f} min")
        page.locator("#history-reset").click()
        expect(page.locator('.ranges [data-range="1 h"]')).to_have_attribute("aria-pressed", "true")
        page.locator('.ranges [data-range="7 d"]').click()
        expect(chart).to_have_attribute("data-agg", "1m")
        expect(page.locator("#history-notes")).to_have_text("100 buckets of 1m (average, min–max band)")
        expect(chart.locator(".u-legend")).to_contain_text("max")
        shot("tag-chart-aggregates")
    finally:
        page.unroute("**/api/v1/history?*")


def plc_setpoint(sim_port):
    """The simulated PLC's setpoint register (HR 10, int16, x10), read with Modbus itself."""
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=sim_port, timeout=3)
    assert client.connect(), f"no Modbus connection to the simulator on {sim_port}"
    try:
        r = client.read_holding_registers(address=10, count=1, device_id=1)
        assert not r.isError(), r
        raw = r.registers[0]
        return (raw - 65536 if raw >= 32768 else raw) / 10
    finally:
        client.close()


def plc_pump(sim_port):
    """The simulated PLC's pump command (coil 1), read with Modbus itself."""
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=sim_port, timeout=3)
    assert client.connect(), f"no Modbus connection to the simulator on {sim_port}"
    try:
        r = client.read_coils(address=1, count=1, device_id=1)
        assert not r.isError(), r
        return bool(r.bits[0])
    finally:
        client.close()


def write_bool(page, app, shot, sim_port):
    """As an operator: a bool tag's toggle written and read back, the coil set in the PLC."""
    step("switch the oven's pump on as the operator: a toggle")
    page.goto(app + "#/tag/" + quote(OVEN_PREFIX + "/pump"))
    value = page.locator("#write-value")
    expect(value).to_have_attribute("type", "checkbox")
    expect(page.locator("#write-limits")).to_have_count(0)
    assert plc_pump(sim_port) is False
    value.check()
    expect(page.locator("#write-bool-text")).to_have_text("true")
    page.locator("#write-confirm").check()
    page.locator("#write-submit").click()
    result = page.locator("#write-result")
    expect(result).to_have_attribute("data-outcome", "good")
    expect(result).to_contain_text("Written: true · was false · read back true")
    expect(page.locator("#tag-value")).to_have_text("true")
    assert plc_pump(sim_port) is True
    shot("tag-write-bool")


def write_back(page, app, shot, sim_port):
    """The tag view's write form: a setpoint written, read back, seen live and in the PLC;
    a value above the tag's max refused by the command handler."""
    step("write plc-1's setpoint from its tag view")
    page.goto(app + "#/tag/" + quote(PLC1 + "/setpoint"))
    form = page.locator("#tag-write")
    expect(form).to_be_visible()
    expect(page.locator("#write-limits")).to_have_text("min 0 · max 100 degC")
    value = page.locator("#write-value")
    expect(value).to_have_attribute("type", "number")
    before = plc_setpoint(sim_port)
    assert before != 42.5, before
    value.fill("42.5")
    page.locator("#write-confirm").check()
    shot("tag-write-form")
    page.locator("#write-submit").click()
    result = page.locator("#write-result")
    expect(result).to_have_attribute("data-outcome", "good")
    expect(result).to_contain_text("Written: 42.5")
    expect(result).to_contain_text("read back 42.5")
    step(f"the answer: {result.inner_text()!r}")
    expect(page.locator("#tag-value")).to_have_text("42.5")
    assert plc_setpoint(sim_port) == 42.5, plc_setpoint(sim_port)
    shot("tag-written")

    step("a value above the tag's max: the command handler's refusal")
    value.fill("150")
    page.locator("#write-submit").click()
    expect(result).to_have_attribute("data-outcome", "error")
    expect(result).to_contain_text(re.compile(r"^Refused: .*150"))
    step(f"the refusal: {result.inner_text()!r}")
    shot("tag-write-refused")
    assert plc_setpoint(sim_port) == 42.5, plc_setpoint(sim_port)
    expect(page.locator("#tag-value")).to_have_text("42.5")

    step("a read-only tag: no form")
    page.goto(app + "#/tag/" + quote(PLC1 + "/temperature"))
    expect(page.locator("#tag-live")).to_be_visible()
    expect(page.locator("#tag-write-box")).to_have_attribute("data-write", "none")
    expect(form).to_have_count(0)


OVEN_PREFIX = "test/plant/packaging/line-5/oven"
OVEN = OVEN_PREFIX + "/temperature"
HOT = "hot:" + OVEN


def alarms_operator(page, app, shot, operator):
    """As an operator: the active alarm acknowledged with a comment, shelved and unshelved;
    the rules; the journal."""
    step("the alarms page as an operator")
    page.locator("#nav [data-nav=alarms]").click()
    expect(page).to_have_url(app + "#/alarms")
    alarm = page.locator(f'#alarms-table tr[data-alarm="{HOT}"]')
    expect(alarm).to_have_attribute("data-state", "active_unacked", timeout=30_000)
    expect(alarm.locator(".state")).to_have_text("active, unacknowledged")
    expect(alarm.locator(".prio")).to_have_text("high")
    expect(page.locator("#read-only")).to_have_count(0)
    page.locator("#rules summary").click()
    expect(page.locator('#rules-table tr[data-rule="hot"]')).to_contain_text(OVEN)
    shot("alarms")

    step("acknowledge it with a comment")
    alarm.locator('[data-action="ack"]').click()
    dialog = page.locator("#alarm-dialog")
    expect(dialog).to_contain_text(OVEN)
    expect(dialog.locator("#shelve-minutes")).to_have_count(0)
    expect(dialog).not_to_contain_text("null")
    page.locator("#action-comment").fill("checked the cooling, from the browser test")
    shot("alarm-ack-dialog")
    page.locator("#dialog-ok").click()
    expect(page.locator("#toasts")).to_contain_text(f"Acknowledged: hot on {OVEN}")
    expect(alarm).to_have_attribute("data-state", "active_acked")
    expect(alarm.locator(".state")).to_have_text("active, acknowledged")
    expect(alarm.locator('[data-action="ack"]')).to_have_count(0)
    expect(page.locator("#toasts .toast")).to_have_count(0, timeout=10_000)
    shot("alarms-acknowledged")

    step("acknowledging again is refused by the alert service, and said so")
    answer = page.evaluate(
        """async (id) => {
            const r = await fetch(`/api/v1/alarms/${encodeURIComponent(id)}/ack`, {
                method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"});
            return {status: r.status, body: await r.text()};
        }""",
        HOT,
    )
    assert answer["status"] == 409, answer

    step("shelve it for a number of minutes, then unshelve it")
    alarm.locator('[data-action="shelve"]').click()
    page.locator("#dialog-ok").click()
    expect(page.locator("#dialog-error")).to_be_visible()
    page.locator("#shelve-minutes").fill("5")
    page.locator("#dialog-ok").click()
    expect(alarm.locator('[data-flag="shelved"]')).to_contain_text("shelved until")
    expect(page.locator("#toasts .toast")).to_have_count(0, timeout=10_000)
    shot("alarm-shelved")
    alarm.locator('[data-action="unshelve"]').click()
    expect(alarm.locator('[data-flag="shelved"]')).to_have_count(0)
    expect(alarm.locator('[data-action="shelve"]')).to_be_visible()

    step("out of service, then in service")
    alarm.locator('[data-action="out_of_service"]').click()
    expect(alarm.locator('[data-flag="out_of_service"]')).to_have_text("out of service")
    alarm.locator('[data-action="in_service"]').click()
    expect(alarm.locator('[data-flag="out_of_service"]')).to_have_count(0)
    expect(alarm.locator('[data-action="out_of_service"]')).to_be_visible()

    step("sort by time, then priority")
    page.locator('#alarms-table [data-sort="time"]').click()
    expect(page.locator('#alarms-table [data-sort="time"]')).to_have_attribute("aria-sort", "descending")
    page.locator('#alarms-table [data-sort="priority"]').click()
    expect(page.locator('#alarms-table [data-sort="priority"]')).to_have_attribute("aria-sort", "descending")

    journal(page, operator)
    expect(page.locator("#toasts .toast")).to_have_count(0, timeout=10_000)
    shot("alarms-journal")


def journal(page, operator):
    """The journal (alarm_events, through the alert service): the acknowledgement found by
    the filters, with its user and comment; a bad filter refused in words."""
    step("the alarm journal: the acknowledgement, by user and kind")
    page.locator("#journal-rule").fill("hot")
    page.locator("#journal-user").fill(operator)
    page.locator("#journal-kind").select_option("acknowledged")
    rows = page.locator("#journal-table tbody tr")
    # The journal's writer is asynchronous: ask again until the row is stored.
    for _ in range(20):
        page.locator("#journal-search").click()
        expect(page.locator("#journal-note")).not_to_have_text("")
        if rows.count() > 0:
            break
        page.wait_for_timeout(500)
    expect(rows).to_have_count(1)
    ack = rows.first
    expect(ack).to_have_attribute("data-kind", "acknowledged")
    expect(ack).to_contain_text(OVEN)
    expect(ack).to_contain_text(operator)
    expect(ack).to_contain_text("checked the cooling, from the browser test")
    expect(ack).to_contain_text("active, acknowledged")
    expect(page.locator("#journal-note")).to_have_text("1 event, newest first")
    step(f"journal row: {ack.inner_text()!r}")

    step("the journal's whole history of the alarm, newest first")
    page.locator("#journal-user").fill("")
    page.locator("#journal-kind").select_option("")
    in_service = page.locator('#journal-table tbody tr[data-kind="in_service"]')
    for _ in range(20):
        page.locator("#journal-search").click()
        expect(page.locator("#journal-note")).not_to_have_text("")
        if in_service.count() > 0:
            break
        page.wait_for_timeout(500)
    expect(in_service).to_have_count(1)
    kinds = page.locator("#journal-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.kind)")
    step(f"the alarm's events, newest first: {kinds}")
    # What the operator did, in order, after the alarm was raised (back in service, it may
    # be raised again).
    done = ["in_service", "out_of_service", "unshelved", "shelved", "acknowledged", "activated"]
    assert kinds[kinds.index("in_service"):] == done, kinds

    step("a topic filter that is not one: the server's refusal, in words")
    page.locator("#journal-topic").fill("a/#/b")
    page.locator("#journal-search").click()
    expect(page.locator("#journal-error")).to_contain_text("The journal could not be read: ")
    step(f"the refusal: {page.locator('#journal-error').inner_text()!r}")
    page.locator("#journal-topic").fill("")
    page.locator("#journal-search").click()
    expect(page.locator('#journal-table tbody tr[data-kind="in_service"]')).to_have_count(1)


def opcua_browse(page, app, shot, port):
    """A new OPC UA device: its server browsed from Objects to Simulator, a variable added as
    a tag to the JSON, the breadcrumb back up."""
    step("a new OPC UA device: browse its server and add a variable as a tag")
    page.goto(app + "#/devices/new")
    page.locator("#protocol").select_option("opcua")
    area = page.locator("#device-json")
    device = json.loads(area.input_value())
    device["id"] = "ua-1"
    device["uns_prefix"] = "test/plant/packaging/line-7"
    device["connection"] = {"endpoint": f"opc.tcp://127.0.0.1:{port}/", "timeout": "5s"}
    area.fill(json.dumps(device, indent=2))
    # The API checks the whole device: the template's tag has no id yet.
    page.locator("#browse-start").click()
    expect(page.locator("#browse-status")).to_contain_text("Browse failed", timeout=35_000)
    expect(page.locator("#browse-status")).to_contain_text("tags[0].id")
    device["tags"] = [{"id": "ramp", "node_id": "ns=2;s=Ramp", "data_type": "int32"}]
    area.fill(json.dumps(device, indent=2))
    page.locator("#browse-start").click()
    simulator = page.locator("#browse-list li", has=page.get_by_role("link", name="Simulator", exact=True))
    try:
        expect(simulator).to_have_count(1, timeout=35_000)
    except AssertionError as e:
        status = page.locator("#browse-status").inner_text()
        raise AssertionError(f"no Simulator node; the browse's status: {status!r}") from e
    simulator.get_by_role("link", name="Simulator", exact=True).click()
    sine = page.locator('#browse-list li[data-node-class="Variable"]', has_text="Sine")
    expect(sine).to_have_count(1, timeout=35_000)
    expect(page.locator("#browse-crumbs")).to_have_text("Objects / Simulator")
    shot("device-opcua-browse")
    sine.get_by_role("button", name="Add as tag").click()
    tags = json.loads(area.input_value())["tags"]
    added = [t for t in tags if t["id"] == "Sine"]
    assert len(added) == 1, tags
    assert added[0]["data_type"] == "float64", added
    assert added[0]["node_id"] == sine.get_attribute("data-node"), (added, sine.get_attribute("data-node"))
    step(f"added {added[0]}")
    sine.get_by_role("button", name="Add as tag").click()
    ids = [t["id"] for t in json.loads(area.input_value())["tags"]]
    assert "Sine_2" in ids, ids
    page.locator("#browse-crumbs").get_by_role("link", name="Objects").click()
    expect(simulator).to_have_count(1, timeout=35_000)
    expect(page.locator("#browse-crumbs")).to_have_text("Objects")


def api_get(page, path):
    """`GET path` from the page (its session), as JSON."""
    answer = page.evaluate(
        """async (path) => {
            const r = await fetch(path, {headers: {"X-Requested-With": "XMLHttpRequest"}});
            return {status: r.status, body: await r.text()};
        }""",
        path,
    )
    assert answer["status"] == 200, answer
    return json.loads(answer["body"])


def transferred(responses, base):
    """Bytes per URL of `responses`, a stream's counted by what it had sent (nothing, as it
    has not ended): the first load of a page."""
    loaded = {}
    for resp in responses:
        if resp.url.endswith("/stream") or "/stream?" in resp.url:
            loaded.setdefault(resp.url, 0)
            continue
        try:
            loaded[resp.url] = loaded.get(resp.url, 0) + len(resp.body())
        except Exception:  # a redirect or an aborted request has no body
            loaded.setdefault(resp.url, 0)
    return loaded


def login(page, user, password):
    page.locator("#username").fill(user)
    page.locator("#password").fill(password)
    page.get_by_role("button", name="Log in").click()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--sim-port", type=int, required=True)
    ap.add_argument("--opcua-port", type=int, required=True)
    ap.add_argument("--off-port", type=int, required=True, help="a port nothing listens on")
    ap.add_argument("--screenshots", required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    admin, admin_pw = os.environ["NEXUS_UI_ADMIN"].split(":", 1)
    operator, operator_pw = os.environ["NEXUS_UI_OPERATOR"].split(":", 1)
    viewer, viewer_pw = os.environ["NEXUS_UI_VIEWER"].split(":", 1)
    base = args.url.rstrip("/")
    for old in os.listdir(args.screenshots):
        if old.endswith(".png"):
            os.remove(os.path.join(args.screenshots, old))

    # A 401 with `WWW-Authenticate: Basic` makes a browser ask for Basic credentials with a
    # dialog of its own, over the page (headless Chromium waits for an answer for ever), so
    # the API must not challenge the page's calls, which say X-Requested-With.
    challenged = challenges_scripts(base)
    assert not challenged, challenged
    profile = tempfile.mkdtemp(prefix="nexus-ui-profile-")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                profile,
                executable_path=args.chromium,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 800},
            )
            try:
                run(browser, base, args, (admin, admin_pw), (operator, operator_pw), (viewer, viewer_pw))
            finally:
                browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    print("OK")


def challenges_scripts(base):
    """What is wrong when the API asks a script's call for Basic credentials, else None."""
    req = urllib.request.Request(
        base + "/api/v1/whoami",
        headers={"X-Requested-With": "XMLHttpRequest", "Accept": "application/json"},
    )
    try:
        urllib.request.urlopen(req, timeout=5)
        return None
    except urllib.error.HTTPError as e:
        if e.code == 401 and e.headers.get("WWW-Authenticate"):
            return (
                "GET /api/v1/whoami with X-Requested-With: XMLHttpRequest and no credentials "
                f"answers 401 with WWW-Authenticate: {e.headers.get('WWW-Authenticate')}"
            )
        return None


def run(browser, base, args, admin_login, operator_login, viewer_login):
    (admin, admin_pw), (operator, operator_pw), (viewer, viewer_pw) = admin_login, operator_login, viewer_login
    app = base + "/ui/"
    expect.set_options(timeout=15_000)
    page = browser.pages[0] if browser.pages else browser.new_page()
    shot = Shots(page, args.screenshots)

    # Anything the page logs as an error (a script error, a CSP violation) fails the test.
    problems = []
    # Refusals the flow expects (401, 403, 422) are logged by Chromium as failed loads: not these.
    page.on(
        "console",
        lambda m: m.type == "error"
        and not m.text.startswith("Failed to load resource: the server responded with a status of 4")
        and problems.append(f"console: {m.text}"),
    )
    # So is the history's 503 (the answer of a database away): only that one.
    history_503 = []
    page.on(
        "response",
        lambda r: r.status == 503
        and ("/api/v1/history?" in r.url or "/api/v1/alarms/journal?" in r.url)
        and history_503.append(r.url),
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    # First load: every response the page gets until it is idle, bodies summed.
    responses = []
    def collect(resp):
        responses.append(resp)

    page.on("response", collect)
    page.goto(app)
    page.wait_for_load_state("networkidle")
    login_page = transferred(responses, base)

    # Nobody is logged in (auth.anonymous is off): the login form.
    expect(page).to_have_url(app + "#/login")
    expect(page.locator("#username")).to_be_visible()
    shot("login")
    login(page, admin, "wrong password")
    expect(page.locator("#login-error")).to_have_text("The user name or password is wrong.")
    shot("login-refused")

    step("log in as the admin")
    responses.clear()
    login(page, admin, admin_pw)
    expect(page).to_have_url(app + "#/overview")
    expect(page.locator("#user-name")).to_have_text(admin)
    expect(page.locator("#user-role")).to_have_text("admin")
    plc1 = page.locator('#overview-devices tr[data-device="plc-1"]')
    expect(plc1.locator(".state")).to_have_text("online", timeout=30_000)
    # The overview is live: its status comes as server-sent events.
    expect(page.locator("#overview-updated")).to_have_attribute("data-state", "live")
    page.wait_for_timeout(1000)
    page.remove_listener("response", collect)
    overview_page = transferred(responses, base)
    total = sum(login_page.values()) + sum(overview_page.values())
    step(f"first load: the login page {sum(login_page.values())} bytes in {len(login_page)} responses, "
         f"then the overview {sum(overview_page.values())} bytes in {len(overview_page)} responses: {total} bytes")
    for url, size in sorted({**login_page, **overview_page}.items()):
        print(f"    {size:>7}  {url.removeprefix(base)}")
    assert total <= FIRST_LOAD_BUDGET, f"first load is {total} bytes, over {FIRST_LOAD_BUDGET}"
    # Only this origin is ever asked.
    assert all(u.startswith(base + "/") for u in {**login_page, **overview_page}), sorted(overview_page)
    expect(plc1.locator(".breaker")).to_have_text("closed")
    expect(page.locator('#overview-services tr[data-service^="gateway/"] .state')).to_have_text("online")
    # Poll statistics from the device's status: polls that read it, none failed.
    expect(plc1.locator(".polls")).to_have_text(re.compile(r"^[1-9][0-9]* / 0 / [0-9]+$"))
    expect(plc1.locator(".last-poll")).to_have_text(re.compile(r"^[0-9]+(\.[0-9])? ms$"))
    # Ingestion's figures from its status (republished every 5 s).
    expect(page.locator("#tile-db .tile-value")).to_have_text("up", timeout=15_000)
    expect(page.locator("#tile-wal .tile-value")).to_have_text(re.compile(r"^[0-9]+\.[0-9]+ %$"))
    expect(page.locator("#tile-rate .tile-value")).to_have_text(re.compile(r"^[0-9][0-9,.]*$"))
    shot("overview")

    namespace(page, app, shot)
    write_back(page, app, shot, args.sim_port)

    step("devices")
    page.locator("#nav [data-nav=devices]").click()
    expect(page).to_have_url(app + "#/devices")
    plc1_row = page.locator('#devices-table tr[data-device="plc-1"]')
    expect(plc1_row).to_contain_text("modbus")
    expect(plc1_row).to_contain_text(f"127.0.0.1:{args.sim_port}")
    expect(plc1_row.locator('[data-action="edit"]')).to_be_visible()
    expect(plc1_row.locator('[data-action="delete"]')).to_be_visible()
    shot("devices")

    step("plc-1's page, as an admin: the form with its values")
    plc1_row.get_by_role("link", name="plc-1").click()
    expect(page).to_have_url(app + "#/devices/plc-1")
    expect(page.locator('input[data-field="connection.port"]')).to_have_value(str(args.sim_port))
    expect(page.locator('input[data-field="tags[1].id"]')).to_have_value("setpoint")
    expect(page.locator('select[data-field="tags[1].access"]')).to_have_value("readwrite")
    shot("device-edit")
    page.get_by_role("button", name="Validate").click()
    expect(page.locator("#problems")).to_contain_text("Valid")

    step("test plc-1's connection from the form: each tag read once from the simulator")
    page.locator('input[data-field="tags[0].unit"]').fill("K")  # as the form would save it, unsaved
    page.get_by_role("button", name="Test connection").click()
    verdict = page.locator("#test-verdict")
    expect(verdict).to_contain_text("Connected: every tag read with good quality", timeout=35_000)
    expect(page.get_by_role("button", name="Test connection")).to_be_enabled()
    temperature = page.locator('#test-tags tr[data-tag="temperature"]')
    expect(temperature.locator(".value")).to_have_text(re.compile(r"^-?\d+(\.\d+)?$"))
    expect(temperature).to_contain_text("good")
    expect(page.locator('#test-tags tr[data-tag="setpoint"] .value')).to_have_text("42.5")
    expect(page.locator('#test-tags tr[data-tag="running"] .value')).to_have_text(re.compile(r"^(true|false)$"))
    step(f"test connection: {verdict.inner_text()!r}, temperature {temperature.locator('.value').inner_text()}")
    shot("device-test-connection")

    step("a connection test of a device that does not answer says why")
    page.locator('input[data-field="connection.port"]').fill(str(args.off_port))
    page.locator('input[data-field="connection.timeout"]').fill("300ms")
    page.get_by_role("button", name="Test connection").click()
    expect(verdict).to_contain_text("Failed after", timeout=35_000)
    step(f"test connection to nothing: {verdict.inner_text()!r}")
    shot("device-test-connection-failed")
    page.locator('input[data-field="connection.port"]').fill("70000")
    page.get_by_role("button", name="Test connection").click()
    port_error = page.locator(".field", has=page.locator('input[data-field="connection.port"]')).locator(".field-error")
    expect(port_error).to_be_visible()
    expect(page.locator("#test-result")).to_be_hidden()

    opcua_browse(page, app, shot, args.opcua_port)

    step("add plc-2 through the form, with a bad port first")
    page.locator("#nav [data-nav=devices]").click()
    page.locator("#add-device").click()
    expect(page).to_have_url(app + "#/devices/new")
    page.locator('input[data-field="id"]').fill("plc-2")
    page.locator('input[data-field="uns_prefix"]').fill("test/plant/packaging/line-2")
    page.locator('input[data-field="poll_interval"]').fill("200ms")
    page.locator('input[data-field="connection.host"]').fill("127.0.0.1")
    port = page.locator('input[data-field="connection.port"]')
    port.fill("70000")
    page.locator('input[data-field="connection.unit_id"]').fill("1")
    page.locator('input[data-field="tags[0].id"]').fill("temperature")
    page.locator('input[data-field="tags[0].address"]').fill("HR:0")
    page.locator('select[data-field="tags[0].data_type"]').select_option("float32")
    page.locator('input[data-field="tags[0].unit"]').fill("degC")
    page.locator("#add-tag").click()
    page.locator('input[data-field="tags[1].id"]').fill("running")
    page.locator('input[data-field="tags[1].address"]').fill("CO:0")
    page.locator('select[data-field="tags[1].data_type"]').select_option("bool")
    page.get_by_role("button", name="Validate").click()
    port_error = page.locator(".field", has=port).locator(".field-error")
    expect(port_error).to_be_visible()
    expect(port).to_have_attribute("aria-invalid", "true")
    step(f"the port's problem: {port_error.inner_text()!r}")
    shot("device-new-invalid")

    port.fill(str(args.sim_port))
    page.get_by_role("button", name="Validate").click()
    expect(page.locator("#problems")).to_contain_text("Valid")
    expect(port_error).to_be_hidden()
    shot("device-new-valid")
    page.locator("#save").click()
    expect(page).to_have_url(app + "#/devices")
    expect(page.locator('#devices-table tr[data-device="plc-2"]')).to_contain_text("test/plant/packaging/line-2")
    shot("devices-added")

    step("plc-2 comes online in the overview")
    page.locator("#nav [data-nav=overview]").click()
    plc2 = page.locator('#overview-devices tr[data-device="plc-2"]')
    expect(plc2.locator(".state")).to_have_text("online", timeout=30_000)
    shot("overview-with-plc-2")

    step("plc-2's values arrive in the namespace")
    plc2.locator(".topics-link").click()
    expect(page).to_have_url(app + "#/namespace?filter=" + quote(PLC2 + "/#"))
    temperature2 = row(page, PLC2 + "/temperature")
    expect(temperature2.locator(".ns-q")).to_have_text("good", timeout=15_000)
    expect(temperature2.locator(".ns-unit")).to_have_text("degC")
    first2 = temperature2.locator(".ns-value").inner_text()
    expect(temperature2.locator(".ns-value")).not_to_have_text(first2, timeout=10_000)
    expect(row(page, PLC2 + "/running").locator(".ns-value")).to_have_text(re.compile(r"^(true|false)$"))
    step(f"plc-2's temperature went from {first2} to {temperature2.locator('.ns-value').inner_text()}")
    shot("namespace-plc-2")

    step("edit plc-2 through the form: its poll interval, saved")
    page.locator("#nav [data-nav=devices]").click()
    page.locator('#devices-table tr[data-device="plc-2"]').get_by_role("link", name="plc-2").click()
    expect(page).to_have_url(app + "#/devices/plc-2")
    interval = page.locator('input[data-field="poll_interval"]')
    expect(interval).to_have_value("200ms")
    interval.fill("300ms")
    page.locator("#save").click()
    expect(page).to_have_url(app + "#/devices")
    saved = api_get(page, "/api/v1/devices/plc-2")
    assert saved["config"]["poll_interval"] == "300ms", saved
    expect(page.locator('#devices-table tr[data-device="plc-1"]')).to_be_visible()

    step("disable plc-2, then delete it after confirming")
    page.locator("#nav [data-nav=devices]").click()
    row2 = page.locator('#devices-table tr[data-device="plc-2"]')
    row2.locator('[data-action="disable"]').click()
    expect(row2.locator(".pill")).to_have_text("disabled")
    expect(row2.locator('[data-action="enable"]')).to_be_visible()
    row2.locator('[data-action="delete"]').click()
    dialog = page.locator("dialog")
    expect(dialog).to_contain_text("Delete plc-2?")
    shot("device-delete-confirm")
    dialog.get_by_role("button", name="Cancel").click()
    expect(row2).to_be_visible()
    row2.locator('[data-action="delete"]').click()
    page.locator("dialog").get_by_role("button", name="Delete").click()
    expect(row2).to_have_count(0)
    expect(page.locator('#devices-table tr[data-device="plc-1"]')).to_be_visible()

    step("the overview no longer lists plc-2")
    page.locator("#nav [data-nav=overview]").click()
    expect(page.locator('#overview-devices tr[data-device="plc-1"] .state')).to_have_text("online")
    expect(page.locator('#overview-devices tr[data-device="plc-2"]')).to_have_count(0)
    shot("overview-after-delete")

    step("log out")
    page.locator("#logout").click()
    expect(page).to_have_url(app + "#/login")
    expect(page.locator("#nav")).to_be_hidden()

    step("log in as an operator")
    login(page, operator, operator_pw)
    expect(page.locator("#user-role")).to_have_text("operator")
    write_bool(page, app, shot, args.sim_port)
    alarms_operator(page, app, shot, operator)

    step("the overview counts the active alarm and links to the alarms")
    page.locator("#nav [data-nav=overview]").click()
    expect(page.locator("#tile-alarms .tile-value")).to_have_text("1")
    expect(page.locator("#tile-alarms")).to_contain_text("Active alarms")
    expect(page.locator("#tile-ingest .tile-value")).to_have_text("online")
    # The demo's values keep changing, so ingestion receives points every second.
    expect(page.locator("#tile-rate .tile-value")).to_have_text(re.compile(r"^[1-9][0-9,.]*$"), timeout=15_000)
    shot("overview-alarms")
    page.locator("#tile-alarms").click()
    expect(page).to_have_url(app + "#/alarms")
    page.locator("#logout").click()
    expect(page).to_have_url(app + "#/login")

    step("log in as a viewer: nothing to change is offered")
    login(page, viewer, viewer_pw)
    expect(page.locator("#user-role")).to_have_text("viewer")
    expect(page.locator('#overview-devices tr[data-device="plc-1"] .state')).to_have_text("online")
    page.locator("#nav [data-nav=devices]").click()
    expect(page.locator('#devices-table tr[data-device="plc-1"]')).to_be_visible()
    expect(page.locator("#read-only")).to_be_visible()
    expect(page.locator("#add-device")).to_have_count(0)
    expect(page.locator("[data-action]")).to_have_count(0)
    shot("devices-viewer")
    page.locator('#devices-table tr[data-device="plc-1"]').get_by_role("link", name="plc-1").click()
    expect(page.locator('input[data-field="connection.port"]')).to_be_disabled()
    expect(page.get_by_role("button", name="Validate")).to_have_count(0)
    expect(page.locator("#save")).to_have_count(0)
    expect(page.locator("#add-tag")).to_have_count(0)
    shot("device-viewer")
    page.goto(app + "#/devices/new")
    expect(page.locator(".banner")).to_contain_text("needs the admin role")
    expect(page.locator("#device-form")).to_have_count(0)

    step("the API refuses the viewer anyway")
    answer = page.evaluate(
        """async (port) => {
            const r = await fetch("/api/v1/devices", {
                method: "POST",
                headers: {"Content-Type": "application/json"},
                body: JSON.stringify({id: "plc-3", protocol: "modbus", uns_prefix: "test/plant/packaging/line-3",
                    connection: {host: "127.0.0.1", port}, tags: [{id: "t", address: "HR:0", data_type: "uint16"}]}),
            });
            return {status: r.status, body: await r.text()};
        }""",
        args.sim_port,
    )
    step(f"POST /api/v1/devices as the viewer: {answer['status']} {answer['body']}")
    assert answer["status"] == 403, answer

    step("the viewer's tag view: the value, no write form; the API refuses a write")
    page.goto(app + "#/tag/" + quote(PLC1 + "/setpoint"))
    expect(page.locator("#tag-value")).to_have_text("42.5")
    expect(page.locator("#tag-write-box")).to_have_attribute("data-write", "not-offered")
    expect(page.locator("#tag-write")).to_have_count(0)
    shot("tag-viewer")
    answer = page.evaluate(
        """async () => {
            const r = await fetch("/api/v1/commands/plc-1/setpoint", {
                method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({value: 10, confirm: false}),
            });
            return {status: r.status, body: await r.text()};
        }""",
    )
    step(f"POST /api/v1/commands/plc-1/setpoint as the viewer: {answer['status']} {answer['body']}")
    assert answer["status"] == 403, answer
    assert plc_setpoint(args.sim_port) == 42.5, plc_setpoint(args.sim_port)

    step("the viewer's alarms: the alarm, no action; the API refuses one")
    page.locator("#nav [data-nav=alarms]").click()
    alarm = page.locator(f'#alarms-table tr[data-alarm="{HOT}"]')
    expect(alarm).to_be_visible()
    expect(page.locator("#read-only")).to_be_visible()
    expect(page.locator("#alarms-table [data-action]")).to_have_count(0)
    shot("alarms-viewer")
    answer = page.evaluate(
        """async (id) => {
            const r = await fetch(`/api/v1/alarms/${encodeURIComponent(id)}/shelve`, {
                method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({duration_s: 60}),
            });
            return {status: r.status, body: await r.text()};
        }""",
        HOT,
    )
    step(f"POST /api/v1/alarms/<id>/shelve as the viewer: {answer['status']} {answer['body']}")
    assert answer["status"] == 403, answer

    unavailable = "console: Failed to load resource: the server responded with a status of 503 (Service Unavailable)"
    if history_503:
        problems = [p for p in problems if p != unavailable]
    assert not problems, "the page reported errors:\n" + "\n".join(problems)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
