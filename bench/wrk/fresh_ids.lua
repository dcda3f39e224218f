-- wrk script for miss runs: every request asks for an id never asked for before.
--
--   wrk -c 64 -t 2 -d 10s --latency -s bench/wrk/fresh_ids.lua http://127.0.0.1:PORT -- /item/ 1000000000
--
-- args: path prefix and a base id. Thread t requests BASE + t*10^7 + 1, + 2, ...,
-- so ids never repeat within a run (no thread sends 10^7 requests in one run) and,
-- with a new base per run, never across runs either: on a cached route every
-- request is a miss on a new key.
-- BENCH_COUNT_HEADER (environment): as in ids.lua, a response header whose values
-- are counted and printed as "XCACHE MISS=123" at the end; unset: not parsed.

local threads = {}
local count_header = os.getenv("BENCH_COUNT_HEADER") or ""

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   prefix = args[1] or "/"
   counter = tonumber(args[2] or "1000000000") + (tid or 0) * 10000000
   counts = {}
end

function request()
   counter = counter + 1
   return wrk.format("GET", prefix .. string.format("%d", counter))
end

if count_header ~= "" then
   local lower = string.lower(count_header)
   function response(status, headers, body)
      local value = headers[lower] or headers[count_header] or "none"
      counts[value] = (counts[value] or 0) + 1
   end
end

function done(summary, latency, requests)
   if count_header == "" then
      return
   end
   local total = {}
   for _, thread in ipairs(threads) do
      local c = thread:get("counts")
      if c then
         for k, v in pairs(c) do total[k] = (total[k] or 0) + v end
      end
   end
   local parts = {}
   for k, v in pairs(total) do table.insert(parts, k .. "=" .. v) end
   table.sort(parts)
   io.write("XCACHE " .. table.concat(parts, " ") .. "\n")
end
