-- wrk script: POST one JSON body over and over, check every answer, print a JSON summary.
-- usage: wrk -s bench/post.lua URL -- BODY_FILE EXPECTED_SUBSTRING [JSON_HEADER_LENGTH]
-- An answer counts as bad unless it is a 200 whose body holds EXPECTED_SUBSTRING (the
-- "predictions" the body's samples must get). With JSON_HEADER_LENGTH the body is a KServe V2
-- binary request (JSON header, then raw tensors), sent with Inference-Header-Content-Length.
-- done() prints one line: "WRKJSON {...}".
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  if args[3] then
    wrk.headers["Content-Type"] = "application/octet-stream"
    wrk.headers["Inference-Header-Content-Length"] = args[3]
  else
    wrk.headers["Content-Type"] = "application/json"
  end
  expected = args[2]
  bad = 0
  codes = {}
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
  if status ~= 200 or not string.find(body, expected, 1, true) then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local bad_total, codes_total = 0, {}
  for _, t in ipairs(threads) do
    bad_total = bad_total + t:get("bad")
    for code, n in pairs(t:get("codes")) do
      codes_total[code] = (codes_total[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(codes_total) do
    table.insert(parts, string.format('"%d":%d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"bad_answers":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"status_codes":{%s},"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes, bad_total,
    e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ","),
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
