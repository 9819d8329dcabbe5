/** A CLI failure with a one-line reason and an exit code (2: usage, 1: everything else). */
export class CliError extends Error {
  readonly code: string;
  constructor(code: string, message: string, readonly exitCode = 1) {
    super(message);
    this.name = 'CliError';
    this.code = code;
  }
}

export function usageError(message: string): CliError {
  return new CliError('USAGE', message, 2);
}
