// placeholder until the picture module lands
export function renderChangePicture(_r: Array<{ offsetBytes: number; lengthBytes: number }>, _s: number, _o: Record<string, unknown>): string { return 'x\ny\nz\nw\n'; }
export function renderChangeSvg(_r: Array<{ offsetBytes: number; lengthBytes: number }>, _s: number, _o: Record<string, unknown>): string { return '<svg></svg>'; }
