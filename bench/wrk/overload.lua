-- wrk script of bench/overload.py: a paced mix of hot, stale and cold keys, shared by several wrk processes.
--
--   wrk -c 256 -t 1 -d 10s --latency -H 'Host: overload.bench' -s bench/wrk/overload.lua http://127.0.0.1:PORT \
--       -- RATE T0_MS COLD_BASE WINDOW_MS HOT_N STALE_N HOT_W STALE_W COLD_W
--
-- RATE: requests per second this wrk process offers (0: as fast as the connections
--   allow, plain closed loop). Each thread keeps a schedule of send times RATE/threads
--   apart; delay() holds a connection until the next free slot. A connection that
--   comes back after its slot has passed sends at once and the send is counted late:
--   under saturation every send is late and the load is closed-loop over -c connections.
-- T0_MS: wall-clock start of the run in ms, the same for every wrk process of the run,
--   so they all request the same cold key at the same moment.
-- COLD_BASE, WINDOW_MS: the cold key is /cold/(COLD_BASE + floor((now - T0) / WINDOW)):
--   a key never asked for before, asked by every connection of every process during
--   its window (the fleet-wide stampede), then never again.
-- HOT_N, STALE_N: /hot/0 .. /hot/<HOT_N-1> (pre-warmed), /stale/0 .. (warmed, short ttl).
-- HOT_W, STALE_W, COLD_W: integer weights of the three kinds, interleaved per request.
--
-- Prints at the end, for bench/overload.py:
--   STATUS 200=123 503=4          response counts by status
--   RETRYAFTER 4                   503 responses carrying Retry-After
--   XCACHE HIT=... MISS=...        X-Cache values (as bench/common.py's parse_wrk reads them)
--   PACE sent=N late=M             sends, and those that left after their slot
--   QUANTILES us1 us2 ... us1000   the latency quantiles 0.1% .. 100% in microseconds (to merge processes)

local ffi = require("ffi")
ffi.cdef [[
   typedef struct { long tv_sec; long tv_nsec; } overload_timespec;
   int clock_gettime(int clk, overload_timespec *ts);
]]
local ts = ffi.new("overload_timespec")

local function now_ms()
   ffi.C.clock_gettime(0, ts) -- CLOCK_REALTIME: comparable across processes
   return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   local nthreads = #threads > 0 and #threads or 1
   rate = tonumber(args[1] or "0") / nthreads
   t0 = tonumber(args[2] or "0")
   cold_base = tonumber(args[3] or "1000000")
   window = tonumber(args[4] or "100")
   local hot_n, stale_n = tonumber(args[5] or "100"), tonumber(args[6] or "50")
   local weights = {tonumber(args[7] or "7"), tonumber(args[8] or "2"), tonumber(args[9] or "1")}
   hot, stale = {}, {}
   for i = 0, hot_n - 1 do hot[i] = wrk.format("GET", "/hot/" .. i) end
   for i = 0, stale_n - 1 do stale[i] = wrk.format("GET", "/stale/" .. i) end
   nhot, nstale = hot_n, stale_n
   -- One cycle of kinds, spread out: 7,2,1 -> h h s h h c h s h h ...
   kinds = {}
   local total = weights[1] + weights[2] + weights[3]
   local acc = {0, 0, 0}
   for _ = 1, total do
      local best, pick = -1, 1
      for k = 1, 3 do
         acc[k] = acc[k] + weights[k]
         if acc[k] > best then best, pick = acc[k], k end
      end
      acc[pick] = acc[pick] - total
      table.insert(kinds, pick)
   end
   nkinds = #kinds
   counter = (tid or 0) * 7
   next_send = now_ms()
   sent, late = 0, 0
   statuses, xcache, retry_after = {}, {}, 0
end

function delay()
   if rate <= 0 then return 0 end
   local now = now_ms()
   local slot = next_send
   next_send = next_send + 1000 / rate
   sent = sent + 1
   if slot <= now then
      if slot < now - 1 then late = late + 1 end
      return 0
   end
   return math.floor(slot - now + 0.5)
end

function request()
   counter = counter + 1
   local kind = kinds[counter % nkinds + 1]
   if kind == 1 then return hot[counter % nhot] end
   if kind == 2 then return stale[counter % nstale] end
   local id = cold_base + math.floor((now_ms() - t0) / window)
   return wrk.format("GET", "/cold/" .. string.format("%d", id))
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   if status == 503 and (headers["retry-after"] or headers["Retry-After"]) then retry_after = retry_after + 1 end
   local value = headers["x-cache"] or headers["X-Cache"] or headers["x-fastapi-cache"] or headers["X-FastAPI-Cache"]
   value = value or "none"
   xcache[value] = (xcache[value] or 0) + 1
end

local function joined(total)
   local parts = {}
   for k, v in pairs(total) do table.insert(parts, k .. "=" .. v) end
   table.sort(parts)
   return table.concat(parts, " ")
end

function done(summary, latency, requests)
   local st, xc, ra, s, l = {}, {}, 0, 0, 0
   for _, thread in ipairs(threads) do
      for k, v in pairs(thread:get("statuses") or {}) do st[k] = (st[k] or 0) + v end
      for k, v in pairs(thread:get("xcache") or {}) do xc[k] = (xc[k] or 0) + v end
      ra = ra + (thread:get("retry_after") or 0)
      s = s + (thread:get("sent") or 0)
      l = l + (thread:get("late") or 0)
   end
   io.write("STATUS " .. joined(st) .. "\n")
   io.write("RETRYAFTER " .. ra .. "\n")
   io.write("XCACHE " .. joined(xc) .. "\n")
   io.write("PACE sent=" .. s .. " late=" .. l .. "\n")
   local q = {}
   for i = 1, 1000 do q[i] = string.format("%d", latency:percentile(i / 10)) end
   io.write("QUANTILES " .. table.concat(q, " ") .. "\n")
end
