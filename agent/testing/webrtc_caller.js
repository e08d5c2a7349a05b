// The caller's end of a WebRTC call in a real browser, driven by conversation tests over the DevTools
// protocol. The caller's voice is played into a WebAudio stream that stands in for the microphone;
// the agent's audio is measured (RMS per 20 ms, on the AudioContext's clock) as the browser renders
// it, after Opus, the network and the jitter buffer. Times are AudioContext seconds.
(() => {
  const SLOT_SECS = 0.02;
  const METER = `
    class ChromaMeter extends AudioWorkletProcessor {
      constructor() { super(); this.size = Math.round(sampleRate * ${SLOT_SECS}); this.sum = 0; this.n = 0; this.t = 0; }
      process(inputs) {
        const samples = inputs[0] && inputs[0][0];
        const length = samples ? samples.length : 128;
        for (let i = 0; i < length; i++) {
          if (this.n === 0) this.t = currentTime + i / sampleRate;
          const v = samples ? samples[i] : 0;
          this.sum += v * v;
          if (++this.n === this.size) {
            this.port.postMessage([this.t, Math.sqrt(this.sum / this.n)]);
            this.sum = 0;
            this.n = 0;
          }
        }
        return true;
      }
    }
    registerProcessor("chroma-meter", ChromaMeter);`;

  function gathered(pc, timeoutMs) {
    // The server takes one offer with every candidate (no trickle).
    return new Promise(resolve => {
      if (pc.iceGatheringState === "complete") return resolve();
      const timer = setTimeout(resolve, timeoutMs);
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
      });
    });
  }

  window.chromaCaller = {
    state: "new",  // new, connecting, connected, ended (by the agent), hung up (by this caller), failed
    error: null,
    heard: [],  // [contextTime, rms] per 20 ms of agent audio, not yet taken
    queuedEnd: 0,

    async dial(offerPath) {
      this.state = "connecting";
      const ctx = this.ctx = new AudioContext({sampleRate: 48000});
      await ctx.resume();
      await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([METER], {type: "text/javascript"})));
      this.mic = ctx.createMediaStreamDestination();
      // A source always playing (zeros) keeps the track sending between turns, as a real microphone does;
      // with nothing connected Chromium sends no audio at all.
      const floor = ctx.createConstantSource();
      floor.offset.value = 0;
      floor.connect(this.mic);
      floor.start();
      const pc = this.pc = new RTCPeerConnection();
      // The server reads the first transceiver as the caller's audio and answers on it.
      pc.addTransceiver(this.mic.stream.getAudioTracks()[0], {direction: "sendrecv", streams: [this.mic.stream]});
      this.channel = pc.createDataChannel("events");
      // The agent's side closing the channel is its hang-up.
      this.channel.onclose = () => this.end("ended");
      pc.ontrack = e => this.listen(e.streams[0] || new MediaStream([e.track]));
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === "connected" && this.state === "connecting") this.state = "connected";
        else if (pc.connectionState === "failed") this.end("failed", "the peer connection failed");
        else if (pc.connectionState === "closed") this.end("ended");
      };
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc, 3000);
      const resp = await fetch(offerPath, {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type}),
      });
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok) {
        this.end("failed", `${offerPath} answered ${resp.status}: ${JSON.stringify(body.detail || body)}`);
        throw new Error(this.error);
      }
      await pc.setRemoteDescription({sdp: body.sdp, type: body.type});
      return body.pc_id;
    },

    listen(stream) {
      // Chromium only feeds a remote track to WebAudio while a media element plays it.
      this.player = new Audio();
      this.player.srcObject = stream;
      this.player.play().catch(() => {});
      const meter = new AudioWorkletNode(this.ctx, "chroma-meter");
      meter.port.onmessage = m => this.heard.push(m.data);
      this.ctx.createMediaStreamSource(stream).connect(meter);
      meter.connect(this.ctx.destination);  // pulled by the graph; it outputs silence
    },

    say(base64, rate) {
      const bytes = Uint8Array.from(atob(base64), c => c.charCodeAt(0));
      const pcm = new Int16Array(bytes.buffer);
      const buffer = this.ctx.createBuffer(1, pcm.length, rate);
      const channel = buffer.getChannelData(0);
      for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
      const source = this.ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.mic);
      const start = Math.max(this.ctx.currentTime + 0.01, this.queuedEnd);
      source.start(start);
      this.queuedEnd = start + buffer.duration;
      return [start, this.queuedEnd];
    },

    press(digits) {
      // Keys travel as a data channel message; the server turns each into a DTMF frame.
      this.channel.send(JSON.stringify({type: "chroma-agents", dtmf: digits}));
    },

    take() {
      const heard = this.heard;
      this.heard = [];
      return {heard, state: this.state, error: this.error, now: this.ctx ? this.ctx.currentTime : 0};
    },

    end(state, error = null) {
      if (["ended", "hung up", "failed"].includes(this.state)) return;
      this.state = state;
      this.error = error;
    },

    hangUp() {
      // Closing the peer connection is what tells the server the call is over.
      this.end("hung up");
      if (this.pc) this.pc.close();
    },
  };
})();
